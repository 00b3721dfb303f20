"""torpor.socketpath: the default socket."""

from __future__ import annotations

import pytest
from torpor.socketpath import standard_socket_path

# -- the default socket ----------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "euid", "expected"),
    [
        ({"XDG_RUNTIME_DIR": "/run/user/0"}, 0, "/run/torpor/torpor.sock"),
        ({"XDG_RUNTIME_DIR": "/run/user/1000"}, 1000, "/run/user/1000/torpor/torpor.sock"),
        ({}, 1000, "/tmp/torpor-1000/torpor.sock"),
        ({"XDG_RUNTIME_DIR": ""}, 1000, "/tmp/torpor-1000/torpor.sock"),
        # The XDG spec: a relative path is invalid and must be ignored.
        ({"XDG_RUNTIME_DIR": "run/user/1000"}, 1000, "/tmp/torpor-1000/torpor.sock"),
        ({"XDG_RUNTIME_DIR": "./run"}, 1000, "/tmp/torpor-1000/torpor.sock"),
        ({"XDG_RUNTIME_DIR": "~/run"}, 1000, "/tmp/torpor-1000/torpor.sock"),
    ],
)
def test_standard_socket_path(environ: dict[str, str], euid: int, expected: str) -> None:
    assert standard_socket_path(environ, euid) == expected
