"""torpor.vllm's pieces that need no vLLM: its options and the checkpoint's
identity (the vLLM runs are in tests/vllm)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from torpor.vllm import register
from torpor.vllm.fingerprint import files_identity
from torpor.vllm.options import LoaderOptions


def test_options_default_and_given() -> None:
    assert LoaderOptions.parse({}) == LoaderOptions()
    assert LoaderOptions.parse(None).wait_s == 600
    got = LoaderOptions.parse({"socket": "/s/torpor.sock", "model_id": "m", "wait_s": 3})
    assert (got.socket, got.model_id, got.wait_s) == ("/s/torpor.sock", "m", 3.0)


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ({"sokcet": "/s"}, "unknown model_loader_extra_config key(s) ['sokcet']"),
        ({"socket": ""}, "['socket'] must be a non-empty string"),
        ({"model_id": 7}, "['model_id'] must be a non-empty string"),
        ({"wait_s": -1}, "['wait_s'] must be a non-negative number"),
        ({"wait_s": True}, "['wait_s'] must be a non-negative number"),
        ({"wait_s": float("nan")}, "['wait_s'] must be a non-negative number"),
    ],
)
def test_bad_options_are_named(extra: dict[str, object], names: str) -> None:
    with pytest.raises(ValueError, match="load_format='torpor'") as err:
        LoaderOptions.parse(extra)
    assert names in str(err.value)


def test_identity_is_by_stat_and_config_bytes(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"a": 1}')
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x" * 64)
    (tmp_path / ".hidden").write_text("ignored")
    (tmp_path / "sub").mkdir()
    first = files_identity(str(tmp_path))
    assert [entry[0] for entry in first] == [
        "config.json",
        "model.safetensors",
        "config.json#sha256",
    ]
    # Same inode, size and mtime: the same identity, whatever the bytes
    # (the identity is taken without reading the weights).
    st = weights.stat()
    weights.write_bytes(b"y" * 64)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert files_identity(str(tmp_path)) == first
    # A rewritten file (new mtime) or a changed config is another identity.
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert files_identity(str(tmp_path)) != first
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    (tmp_path / "config.json").write_text('{"a": 2}')
    assert files_identity(str(tmp_path)) != first


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_register_never_raises_without_vllm(caplog: pytest.LogCaptureFixture) -> None:
    register()
    register()
    assert "could not register" in caplog.text
