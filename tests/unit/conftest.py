"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from torpor.v1 import common_pb2

from .fake_daemon import Daemon, serve


@pytest.fixture
def daemon(tmp_path: Path, daemon_models: dict[str, common_pb2.Model]) -> Iterator[Daemon]:
    """A fake torpord (see fake_daemon.py) on a Unix socket under tmp_path.

    It starts out holding `daemon_models`, a fixture each test module that uses
    the daemon defines.
    """
    with serve(tmp_path / "t.sock", daemon_models) as running:
        yield running
