"""torpord.config: [policy], [policy.default] and [[catalogue]]: values, and
errors naming the file, the key (the entry) and what was given."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from torpord.config import ConfigError, Overrides, default_config_toml, load_config
from torpord.policies.settings import (
    EvictionOrder,
    Granularity,
    ModelPolicy,
    PolicySettings,
    Window,
)
from torpord.types import Tier

H = 3600


def write(tmp_path: Path, body: str) -> Path:
    (tmp_path / "models" / "llama").mkdir(parents=True, exist_ok=True)
    path = tmp_path / "torpord.toml"
    path.write_text(
        f'version = 1\n[sources]\nallowed_roots = ["{tmp_path / "models"}"]\n'
        f'[host_pool]\ncapacity = "4GiB"\n{body}'
    )
    return path


def error_for(tmp_path: Path, body: str) -> str:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_defaults() -> None:
    config = load_config(None)
    assert config.policy.settings == PolicySettings()
    assert config.policy.interval == 1.0
    assert config.policy.acquire_patience == 5.0
    assert config.policy.acquire_hold == 10.0
    assert config.catalogue == ()


def test_every_key(tmp_path: Path) -> None:
    models = tmp_path / "models"
    path = write(
        tmp_path,
        f"""
[disk_cache]
path = "{tmp_path / "cache"}"
capacity = "1GiB"
[policy]
enabled = false
eviction = "LFU"
granularity = "layers"
max_sleeping_models = 4
host_limit = "2GiB"
preload = false
preload_min_uses = 2.5
staging = false
interval = "250ms"
acquire_patience = "30s"
acquire_hold = "2s"
[policy.default]
idle_timeout = "5m"
idle_level = 2
priority = -5
pinned = false
evict_to = "source"
[[catalogue]]
id = "llama"
source = "{models / "llama"}"
device = "GPU-1234"
priority = 10
pinned = true
evict_to = "disk"
windows = ["Mon-Fri 08:00-18:00", "Sun 22:00-02:00 device lead 10m"]
[[catalogue]]
id = "qwen"
source = "{models / "qwen.safetensors"}"
""",
    )
    config = load_config(path)
    default = ModelPolicy(idle_timeout=300.0, idle_level=2, priority=-5, evict_to=Tier.SOURCE)
    assert config.policy.settings == PolicySettings(
        enabled=False,
        eviction=EvictionOrder.LFU,
        granularity=Granularity.LAYERS,
        max_sleeping_models=4,
        host_limit=2 * 2**30,
        preload=False,
        preload_min_uses=2.5,
        staging=False,
        default=default,
    )
    assert config.policy.interval == 0.25
    assert config.policy.acquire_patience == 30.0
    assert config.policy.acquire_hold == 2.0
    llama, qwen = config.catalogue
    assert (llama.model_id, llama.device) == ("llama", "GPU-1234")
    weekdays = tuple(Window(d * 24 * H + 8 * H, d * 24 * H + 18 * H) for d in range(5))
    sunday = Window(6 * 24 * H + 22 * H, 2 * H, Tier.DEVICE, 600)
    assert llama.policy == ModelPolicy(
        idle_timeout=300.0,
        idle_level=2,
        priority=10,
        pinned=True,
        evict_to=Tier.DISK,
        windows=(*weekdays, sunday),
    )
    assert (qwen.model_id, qwen.device, qwen.policy) == ("qwen", "", default)


E = '[[catalogue]]\nid = "x"\nsource = "{m}"\n'  # a good entry, to add a bad key to
X = ' (the entry "x")'
TEN_DAILY = "windows = [" + ", ".join(['"daily 01:00-02:00"'] * 10) + "]\n"
BAD = [
    ("[policy]\nenabled = 1\n", "policy.enabled: expected true or false, got 1"),
    ('[policy]\neviction = "fifo"\n', "policy.eviction: expected one of cost, lru, lfu"),
    ('[policy]\ngranularity = "tensor"\n', "policy.granularity: expected one of model, layers"),
    ("[policy]\nmax_sleeping_models = -1\n", "max_sleeping_models: expected an integer from 0"),
    ('[policy]\nhost_limit = "5GiB"\n', "host_limit: expected a byte size up to host_pool"),
    ('[policy]\nhost_limit = "lots"\n', 'policy.host_limit: expected a byte size like "8GiB"'),
    ('[policy]\ninterval = "0s"\n', 'policy.interval: expected a duration from "10ms"'),
    ('[policy]\nacquire_patience = "11m"\n', 'acquire_patience: expected a duration of at most'),
    ('[policy]\nacquire_patience = "soon"\n', "policy.acquire_patience: expected a duration"),
    ('[policy]\nacquire_hold = "11m"\n', 'acquire_hold: expected a duration of at most "10m"'),
    ('[policy]\nacquire_hold = "-1s"\n', "policy.acquire_hold: expected a duration"),
    ("[policy]\npreload_min_uses = 0\n", "policy.preload_min_uses: expected a number of uses"),
    ('[policy]\npreload_min_uses = "1"\n', 'above 0 and at most 1e+06, got "1"'),
    ("[policy]\nstaging = 1\n", "policy.staging: expected true or false, got 1"),
    ("[policy]\nidle_timeout = 5\n", 'did you mean "policy.default.idle_timeout"?'),
    ('[policy.default]\nidle_timeout = "31d"\n', "policy.default.idle_timeout: expected a"),
    ('[policy.default]\nidle_timeout = "45000m"\n', "duration of at most 30 days"),
    ("[policy.default]\nidle_level = 3\n", "policy.default.idle_level: expected 1 (weights"),
    ("[policy.default]\npriority = 1001\n", "priority: expected an integer from -1000 to 1000"),
    ('[policy.default]\npinned = "yes"\n', 'pinned: expected true or false, got "yes"'),
    ('[policy.default]\nevict_to = "device"\n', "evict_to: expected one of host, disk, source"),
    ('[policy.default]\nevict_to = "disk"\n', 'policy.default.evict_to: "disk" needs a disk cache'),
    ('[policy.default]\nwindows = ["daily 01:00-02:00"]\n', "policy.default.windows: unknown key"),
    ('[catalogue]\nid = "x"\n', "catalogue: expected [[catalogue]] tables, got a table"),
    ('[[catalogue]]\nsource = "/x"\n', "catalogue[0].id: expected a model id: 1 to 128 characters"),
    ('[[catalogue]]\nid = "../x"\nsource = "/x"\n', 'catalogue[0].id: expected a model id'),
    ('[[catalogue]]\nid = "x"\n', "[0].source: expected an absolute path, got nothing" + X),
    ('[[catalogue]]\nid = "x"\nsource = "a/b"\n', "must be an absolute path, got 'a/b'" + X),
    ('[[catalogue]]\nid = "x"\nsource = "/etc/passwd"\n', "which is outside the allowed roots"),
    (E + "device = 3\n", 'catalogue[0].device: expected a device UUID or "", got 3' + X),
    (E + 'idle = "5m"\n', 'catalogue[0].idle: unknown key; did you mean "id"?'),
    (E + 'priority = "high"\n', 'catalogue[0].priority: expected an integer from -1000' ),
    (E + 'evict_to = "disk"\n', 'catalogue[0].evict_to: "disk" needs a disk cache'),
    (E + E, 'catalogue[1].id: "x" is already the id of catalogue[0]'),
    (E + 'windows = "daily 01:00-02:00"\n', "catalogue[0].windows: expected an array of windows"),
    (E + 'windows = ["Mon-Fry 08:00-18:00"]\n', 'catalogue[0].windows[0]: unknown day "Fry"'),
    (E + 'windows = ["Mon-Fry 08:00-18:00"]\n', 'in "Mon-Fry 08:00-18:00"' + X),
    (E + 'windows = ["daily 01:00-02:00", 5]\n', "catalogue[0].windows[1]: a window like"),
    (E + 'windows = ["Sat 10:00-10:00"]\n', 'windows[0]: "10:00-10:00": the window is empty'),
    (E + TEN_DAILY, "catalogue[0].windows: expected at most 64 days of windows in all"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "message"), BAD)
def test_bad_values_name_the_key_and_what_was_given(
    tmp_path: Path, body: str, message: str
) -> None:
    body = body.replace("{m}", str(tmp_path / "models" / "llama"))
    text = error_for(tmp_path, body)
    assert text.startswith(f"{tmp_path / 'torpord.toml'}: ")
    assert message in text, text


def test_the_catalogue_is_bounded(tmp_path: Path) -> None:
    source = tmp_path / "models" / "llama"
    entries = "".join(f'[[catalogue]]\nid = "m{i}"\nsource = "{source}"\n' for i in range(1025))
    assert "catalogue: expected at most 1024 entries, got 1025" in error_for(tmp_path, entries)


def test_catalogue_sources_are_checked_against_the_roots_flags_give(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    path = write(tmp_path, f'[[catalogue]]\nid = "x"\nsource = "{other / "m"}"\n')
    with pytest.raises(ConfigError, match="outside the allowed roots"):
        load_config(path)
    config = load_config(path, Overrides(allowed_roots=(str(other),)))
    assert config.catalogue[0].source == str(other / "m")


def test_the_default_config_shows_the_policy_sections_and_reads_back(tmp_path: Path) -> None:
    text = default_config_toml()
    assert "\n[policy]\n" in text and "\n[policy.default]\n" in text
    assert "# [[catalogue]]" in text and 'evict_to = "host"' in text
    path = tmp_path / "default.toml"
    path.write_text(text)
    assert load_config(path).policy == load_config(None).policy
    # The commented example, uncommented, is a valid entry.
    example = (
        text[text.index("# [[catalogue]]") :]
        .replace("# ", "")
        .replace("/var/lib/torpor/models", str(tmp_path))
    )
    path.write_text(text + example.replace("[[catalogue]]", "[[catalogue]]", 1))
    entries = load_config(path, Overrides(allowed_roots=(str(tmp_path),))).catalogue
    assert [e.model_id for e in entries] == ["llama-8b"]
    assert len(entries[0].policy.windows) == 5 + 7 + 1


def test_torpord_check_config_reports_a_catalogue_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[[catalogue]]\nid = "x"\nsource = "/etc/passwd"\n')
    out = subprocess.run(
        [sys.executable, "-m", "torpord", "--config", str(path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "catalogue[0].source" in out.stderr and '(the entry "x")' in out.stderr
