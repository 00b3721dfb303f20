"""[metrics] in torpord's config: off by default, loopback unless allowed,
errors that name the key, and the rendered default config."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from torpord.config import ConfigError, default_config_toml, load_config
from torpord.config.model import MetricsConfig


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "torpord.toml"
    path.write_text("version = 1\n" + body)
    return path


def test_metrics_are_off_by_default(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).metrics == MetricsConfig(None, False)
    assert load_config(write(tmp_path, '[metrics]\nlisten = ""\n')).metrics.listen is None
    assert tomllib.loads(default_config_toml())["metrics"] == {
        "listen": "",
        "allow_remote": False,
        "keep_unloaded": "600s",
    }


def test_an_unloaded_models_series_are_kept_ten_minutes_unless_configured(
    tmp_path: Path,
) -> None:
    assert load_config(write(tmp_path, "")).metrics.keep_unloaded == 600.0
    body = '[metrics]\nkeep_unloaded = "30s"\n'
    assert load_config(write(tmp_path, body)).metrics.keep_unloaded == 30.0
    body = '[metrics]\nkeep_unloaded = "0s"\n'  # (gone after the next scrape)
    assert load_config(write(tmp_path, body)).metrics.keep_unloaded == 0.0


@pytest.mark.parametrize(
    ("listen", "normalised"),
    [
        ("127.0.0.1:9400", "127.0.0.1:9400"),
        ("localhost:9400", "localhost:9400"),
        ("[::1]:9400", "[::1]:9400"),
        ("LOCALHOST:1", "localhost:1"),
    ],
)
def test_a_loopback_listen_needs_nothing_more(tmp_path: Path, listen: str, normalised: str) -> None:
    metrics = load_config(write(tmp_path, f'[metrics]\nlisten = "{listen}"\n')).metrics
    assert metrics.listen == normalised and not metrics.allow_remote


def test_a_remote_listen_with_allow_remote(tmp_path: Path) -> None:
    body = '[metrics]\nlisten = "0.0.0.0:9400"\nallow_remote = true\n'
    assert load_config(write(tmp_path, body)).metrics == MetricsConfig("0.0.0.0:9400", True)


def test_server_allow_remote_does_not_open_the_metrics(tmp_path: Path) -> None:
    body = '[server]\nallow_remote = true\n[metrics]\nlisten = "10.0.0.1:9400"\n'
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, body))
    assert "metrics.listen" in str(info.value)


@pytest.mark.parametrize(
    ("body", "key", "expected"),
    [
        ('listen = "0.0.0.0:9400"', "metrics.listen", "metrics.allow_remote = true"),
        ('listen = "[::]:9400"', "metrics.listen", "metrics.allow_remote = true"),
        ('listen = "9400"', "metrics.listen", "host:port"),
        ('listen = "127.0.0.1:70000"', "metrics.listen", "host:port"),
        ("listen = 9400", "metrics.listen", "host:port"),
        ('allow_remote = "yes"', "metrics.allow_remote", "true or false"),
        ('port = "9400"', "metrics.port", "unknown key"),
        ('keep_unloaded = "soon"', "metrics.keep_unloaded", "duration"),
    ],
)
def test_bad_metrics_settings_name_the_key(
    tmp_path: Path, body: str, key: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"[metrics]\n{body}\n"))
    message = str(info.value)
    assert key in message and expected in message, message
