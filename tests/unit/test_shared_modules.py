"""What the daemon shares with the client package (torpor.boundedjson,
fdwire, layout, cudadriver) loads without gRPC: the daemon's core, storage
and backends import those and speak no gRPC, at run time too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import sys
import torpor.boundedjson, torpor.cudadriver, torpor.fdwire, torpor.layout
import torpord.backends, torpord.core, torpord.storage
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"grpc", "google", "cuda", "cupy"})
print(",".join(loaded))
"""


def test_the_shared_modules_and_the_lower_layers_load_no_grpc() -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'agent'}{os.pathsep}{ROOT / 'daemon'}"}
    out = subprocess.run(
        [sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_the_client_names_load_on_first_use() -> None:
    import torpor
    from torpor.client import Client
    from torpor.errors import TorporError

    assert torpor.Client is Client and torpor.TorporError is TorporError
    assert callable(torpor.default_socket_path)
    try:
        torpor.nothing_here  # noqa: B018
    except AttributeError as err:
        assert "nothing_here" in str(err)
    else:
        raise AssertionError("no AttributeError")
