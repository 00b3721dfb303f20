"""`[policy] history`: the file the activity history is kept in across restarts."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from torpord.config import ConfigError, default_config_toml, load_config

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, body: str) -> Path:
    (tmp_path / "models").mkdir(exist_ok=True)
    path = tmp_path / "torpord.toml"
    path.write_text(
        f'version = 1\n[sources]\nallowed_roots = ["{tmp_path / "models"}"]\n'
        f'[host_pool]\ncapacity = "4GiB"\n{body}'
    )
    return path


def test_off_by_default_and_in_the_default_config(tmp_path: Path) -> None:
    assert load_config(None).policy.history is None
    assert '\nhistory = ""\n' in default_config_toml()
    path = write(tmp_path, '[policy]\nhistory = ""\n')
    assert load_config(path).policy.history is None


def test_an_absolute_path(tmp_path: Path) -> None:
    path = write(tmp_path, f'[policy]\nhistory = "{tmp_path / "state" / "a.json"}"\n')
    assert load_config(path).policy.history == tmp_path / "state" / "a.json"


@pytest.mark.parametrize("value", ['"state/a.json"', "5", "true"])
def test_anything_else_is_refused_naming_the_key(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"[policy]\nhistory = {value}\n"))
    assert f"policy.history: expected an absolute path, got {value}" in str(info.value)


def test_the_service_keeps_it_in_its_state_directory() -> None:
    service = (ROOT / "systemd" / "torpord.service").read_text()
    assert "StateDirectory=torpor\n" in service
    config = tomllib.loads((ROOT / "systemd" / "torpord.toml").read_text())
    assert config["policy"]["history"] == "/var/lib/torpor/activity.json"
