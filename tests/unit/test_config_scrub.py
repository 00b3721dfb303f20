"""`[scrub]`: the scrubber's rate and interval, their defaults and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from torpord.config import ConfigError, default_config_toml, load_config
from torpord.config.model import ScrubConfig


def load(tmp_path: Path, body: str) -> ScrubConfig:
    path = tmp_path / "torpord.toml"
    path.write_text("version = 1\n" + body)
    return load_config(path).scrub


def test_defaults() -> None:
    assert load_config(None).scrub == ScrubConfig(rate=256 * 2**20, interval=3600.0)


@pytest.mark.parametrize(
    ("body", "rate", "interval"),
    [
        ('rate = "1GiB"\ninterval = "10m"', 2**30, 600.0),
        ("rate = 1048576\ninterval = 2.5", 2**20, 2.5),
        ('rate = "0"', 0, 3600.0),  # off
        ("rate = 0", 0, 3600.0),  # off
        ('rate = "0MiB"', 0, 3600.0),  # off
        ('rate = "1.5"', 1, 3600.0),  # (at least a byte a second: rounded down)
        ('interval = "500ms"', 256 * 2**20, 0.5),
    ],
)
def test_values(tmp_path: Path, body: str, rate: int, interval: float) -> None:
    assert load(tmp_path, f"[scrub]\n{body}\n") == ScrubConfig(rate=rate, interval=interval)


@pytest.mark.parametrize(
    ("body", "key", "got"),
    [
        ('rate = "fast"', "scrub.rate", '"fast"'),
        ("rate = -1", "scrub.rate", "-1"),
        ('rate = "1.5GB/s"', "scrub.rate", '"1.5GB/s"'),
        ('interval = "often"', "scrub.interval", '"often"'),
        ("interval = -5", "scrub.interval", "-5"),
        ("interval = true", "scrub.interval", "true"),
    ],
)
def test_errors_name_the_key_and_the_value(tmp_path: Path, body: str, key: str, got: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, f"[scrub]\n{body}\n")
    assert info.value.key == key
    assert got in str(info.value).rpartition(", got ")[2]


@pytest.mark.parametrize("rate", ['"0.5"', '"0.9B"', '".0001KB"', '"0.0000000001GiB"'])
def test_a_rate_under_a_byte_a_second_is_refused_not_taken_for_off(
    tmp_path: Path, rate: str
) -> None:
    # (Rounded down, it would be 0: scrubbing silently off.)
    with pytest.raises(ConfigError) as info:
        load(tmp_path, f"[scrub]\nrate = {rate}\n")
    assert info.value.key == "scrub.rate"
    expected, _, got = str(info.value).rpartition(", got ")
    assert got == rate
    assert '"0" (off)' in expected and "at least one byte a second" in expected


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, '[scrub]\nspeed = "1GiB"\n')
    assert "scrub.speed" in str(info.value)


def test_the_default_file_shows_the_defaults(tmp_path: Path) -> None:
    text = default_config_toml()
    assert "[scrub]" in text
    path = tmp_path / "torpord.toml"
    path.write_text(text)
    assert load_config(path).scrub == load_config(None).scrub
