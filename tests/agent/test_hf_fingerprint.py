"""The fingerprint an image of a Hugging Face directory is found by: what
changes it, what does not (documented), and what it refuses."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torpor.agent.hf_fingerprint import fingerprint, image_id  # noqa: E402

CAUSAL = transformers.AutoModelForCausalLM
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # the daemon's rule


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A directory as save_pretrained leaves it (the weights' bytes do not
    matter: they are never read)."""
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"a" * 100)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"b" * 100)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (tmp_path / "tokenizer.json").write_text("{}")
    return tmp_path


def key(path: Path, model_class: Any = CAUSAL, **kwargs: Any) -> str:
    return fingerprint(path, model_class=model_class, **kwargs)


def test_it_is_stable_readable_and_names_a_valid_model_id(model_dir: Path) -> None:
    first = key(model_dir)
    assert first == key(model_dir)
    assert first.startswith(
        "hf/1/transformers.models.auto.modeling_auto.AutoModelForCausalLM/auto/"
    )
    assert first.isprintable() and len(first.encode()) <= 1024
    assert MODEL_ID.fullmatch(image_id(first))
    assert image_id(first) != image_id(key(model_dir, dtype=torch.float32))


def rewrite_keeping_mtime(path: Path, data: bytes) -> None:
    before = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_what_changes_it(model_dir: Path) -> None:
    base = key(model_dir)
    # What was asked for.
    assert key(model_dir, dtype=torch.bfloat16) != base
    assert key(model_dir, dtype="bfloat16") == key(model_dir, dtype=torch.bfloat16)
    assert key(model_dir, dtype="auto") == base
    assert key(model_dir, model_class=transformers.AutoModel) != base
    assert key(model_dir, options={"rms_norm_eps": 1e-3}) != base
    # config.json and the index by content, even with their size and mtime kept.
    rewrite_keeping_mtime(model_dir / "config.json", b'{"model_type": "qwen2"}')
    assert key(model_dir) != base
    base = key(model_dir)
    rewrite_keeping_mtime(model_dir / "model.safetensors.index.json", b'{"weight_map": []}')
    assert key(model_dir) != base
    # A weight file by its identity: a new mtime, size or inode.
    shard = model_dir / "model-00001-of-00002.safetensors"
    base = key(model_dir)
    os.utime(shard, ns=(0, shard.stat().st_mtime_ns + 1))
    assert key(model_dir) != base
    base = key(model_dir)
    shard.write_bytes(b"a" * 101)
    assert key(model_dir) != base
    # The same bytes and mtime in a new file (a new inode) put in its place.
    base = key(model_dir)
    info = shard.stat()
    copy = model_dir / "copy.tmp"
    copy.write_bytes(shard.read_bytes())
    os.utime(copy, ns=(info.st_atime_ns, info.st_mtime_ns))
    copy.replace(shard)
    assert shard.stat().st_ino != info.st_ino
    assert key(model_dir) != base
    # A new weight file.
    base = key(model_dir)
    (model_dir / "extra.bin").write_bytes(b"c")
    assert key(model_dir) != base


def test_what_does_not_change_it(model_dir: Path) -> None:
    """Documented: weights rewritten in place with their size and mtime kept
    (never read), metadata-only changes, and files transformers does not
    load weights from."""
    base = key(model_dir)
    rewrite_keeping_mtime(model_dir / "model-00002-of-00002.safetensors", b"z" * 100)
    (model_dir / "model-00002-of-00002.safetensors").chmod(0)
    (model_dir / "tokenizer.json").write_text('{"changed": true}')
    (model_dir / "README.md").write_text("hello")
    assert key(model_dir) == base


def test_what_it_refuses(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    with pytest.raises(ValueError, match=r"not a model directory .*snapshot_download"):
        key(model_dir / "config.json")
    with pytest.raises(ValueError, match=r"not a model directory"):
        key(Path("meta-llama/Llama-3-8B"))
    with pytest.raises(ValueError, match=r"dtype must be a torch.dtype"):
        key(model_dir, dtype="float33")
    with pytest.raises(ValueError, match=r"options must be JSON values"):
        key(model_dir, options={"x": object()})
    empty = tmp_path_factory.mktemp("empty")
    (empty / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"no config.json, or no weight files"):
        key(empty)
    # A FIFO where config.json should be: refused, not waited on.
    (model_dir / "config.json").unlink()
    os.mkfifo(model_dir / "config.json")
    with pytest.raises(ValueError, match=r"config.json is not a regular file"):
        key(model_dir)
