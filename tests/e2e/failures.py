"""A call through grpcurl that must fail, and the gRPC status codes the
error tests compare against."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from .conftest import GRPCURL, Daemon

NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, INVALID_ARGUMENT = 5, 6, 7, 3
FAILED_PRECONDITION, ABORTED, RESOURCE_EXHAUSTED, DATA_LOSS = 9, 10, 8, 15


def fail(
    d: Daemon, method: str, data: dict[str, Any], service: str = "ModelService"
) -> dict[str, Any]:
    """Call through grpcurl expecting an error; its status as JSON."""
    out = subprocess.run(
        [
            GRPCURL,
            "-plaintext",
            "-unix",
            "-format-error",
            "-d",
            json.dumps(data),
            str(d.socket),
            f"torpor.v1.{service}/{method}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0, out.stdout
    status: dict[str, Any] = json.loads(out.stderr)  # grpcurl writes the error there
    info = status["details"][0]
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert info["domain"] == "torpor.dev"
    status["reason"] = info["reason"]
    status["metadata"] = info.get("metadata", {})
    return status
