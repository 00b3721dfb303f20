"""The user-facing test helpers (torpor.testing)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from torpor.testing import main, make_checkpoint, write_safetensors
from torpord.storage import open_checkpoint


def header_of(path: Path) -> tuple[int, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, raw[8 : 8 + n]


def test_write_matches_reference_bytes(tmp_path: Path) -> None:
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "w.b": np.arange(5, dtype=np.int16),
        "w.a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "w.c": np.arange(3, dtype=np.float16),
        "flag": np.array([True, False]),
        "big": np.arange(3, dtype=np.uint64),
        "none": np.zeros((0, 4), dtype=np.uint8),
    }
    codes = {
        "int16": "I16",
        "float32": "F32",
        "float16": "F16",
        "bool": "BOOL",
        "uint64": "U64",
        "uint8": "U8",
    }
    save_file(arrays, str(tmp_path / "ref.safetensors"), metadata={"format": "np"})
    mine = write_safetensors(
        tmp_path / "mine.safetensors",
        {k: (codes[str(v.dtype)], v.shape, v.tobytes()) for k, v in arrays.items()},
        {"format": "np"},
    )
    assert mine.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_header_padded_with_spaces(tmp_path: Path) -> None:
    for name in ("a", "ab", "abc", "abcd", "abcde"):
        path = write_safetensors(tmp_path / f"{name}.safetensors", {name: ("U8", [1], b"x")})
        n, header = header_of(path)
        assert n % 8 == 0
        assert json.loads(header) == {name: {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
        assert header == header.rstrip(b" ") + b" " * (n - len(header.rstrip(b" ")))


def test_written_files_load_in_reference(tmp_path: Path) -> None:
    values: dict[str, tuple[str, list[int], np.ndarray[Any, Any]]] = {
        "f32": ("F32", [2, 2], np.array([[1, 2], [3, 4]], dtype=np.float32)),
        "i64": ("I64", [3], np.array([-1, 0, 1], dtype=np.int64)),
        "u16": ("U16", [2], np.array([7, 65535], dtype=np.uint16)),
        "u32": ("U32", [1], np.array([4_000_000_000], dtype=np.uint32)),
        "f64": ("F64", [], np.array(2.5)),
        "b": ("BOOL", [2], np.array([True, False])),
    }
    path = write_safetensors(
        tmp_path / "t.safetensors",
        {k: (d, s, a.tobytes()) for k, (d, s, a) in values.items()},
        {"source": "test"},
    )
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"source": "test"}
        for name, (_, shape, array) in values.items():
            got = f.get_tensor(name)
            assert got.shape == tuple(shape) and got.dtype == array.dtype
            assert np.array_equal(got, array)


def test_write_rejects_wrong_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'x'"):
        write_safetensors(tmp_path / "x.safetensors", {"x": ("F32", [2], b"abc")})
    with pytest.raises(ValueError, match="unknown dtype"):
        write_safetensors(tmp_path / "x.safetensors", {"x": ("F33", [1], b"abcd")})
    with pytest.raises(ValueError, match="whole number of bytes"):
        write_safetensors(tmp_path / "x.safetensors", {"x": ("F4", [3], b"ab")})


def test_single_file_destinations(tmp_path: Path) -> None:
    file_path = make_checkpoint(tmp_path / "deep" / "tiny.safetensors", layers=2)
    assert file_path == tmp_path / "deep" / "tiny.safetensors" and file_path.is_file()
    dir_path = make_checkpoint(tmp_path / "dir", layers=2)
    assert dir_path == tmp_path / "dir" and (dir_path / "model.safetensors").is_file()
    assert not (dir_path / "model.safetensors.index.json").exists()


def test_llama_checkpoint_contents(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "m.safetensors", layers=2, hidden=16, vocab=32)
    with safe_open(str(path), framework="numpy") as f:
        names = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("model.embed_tokens.weight").shape == (32, 16)
        assert f.get_tensor("model.layers.1.mlp.down_proj.weight").dtype == np.float16
    for expected in (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.input_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ):
        assert expected in names
    assert not any(n.startswith("model.layers.2.") for n in names)


def test_gpt2_checkpoint_contents(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "g.safetensors", layers=3, naming="gpt2", dtype="F32")
    names = {t.name for t in open_checkpoint(path).tensors}
    assert {
        "transformer.wte.weight",
        "transformer.h.2.attn.c_attn.weight",
        "transformer.ln_f.weight",
    } <= names
    assert all(n.startswith("transformer.") for n in names)


def test_deterministic_bytes(tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "a.safetensors", seed=3)
    b = make_checkpoint(tmp_path / "b.safetensors", seed=3)
    c = make_checkpoint(tmp_path / "c.safetensors", seed=4)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


@pytest.mark.parametrize("shards", [2, 3, 5])
def test_sharded(tmp_path: Path, shards: int) -> None:
    root = make_checkpoint(tmp_path / "s", layers=4, shards=shards, seed=1)
    files = sorted(p.name for p in root.glob("*.safetensors"))
    assert files == [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)]
    index = json.loads((root / "model.safetensors.index.json").read_text())
    single = make_checkpoint(tmp_path / "one.safetensors", layers=4, seed=1)
    with safe_open(str(single), framework="numpy") as f:
        reference = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert set(index["weight_map"]) == set(reference)
    total = 0
    for name in files:
        with safe_open(str(root / name), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118
                assert index["weight_map"][key] == name
                # Random bits include NaNs, so compare bytes, not values.
                assert f.get_tensor(key).tobytes() == reference[key].tobytes()
                total += reference[key].nbytes
    assert index["metadata"]["total_size"] == total
    assert open_checkpoint(root).data_bytes == total


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="naming"):
        make_checkpoint(tmp_path / "x", naming="t5")
    with pytest.raises(ValueError, match="directory"):
        make_checkpoint(tmp_path / "x.safetensors", shards=2)
    with pytest.raises(ValueError, match="shards"):
        make_checkpoint(tmp_path / "y", layers=0, shards=50)
    with pytest.raises(ValueError):
        make_checkpoint(tmp_path / "z", hidden=0)


def test_main_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-checkpoint", str(tmp_path / "c"), "--layers", "2", "--shards", "2"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(tmp_path / "c")
    assert len(open_checkpoint(printed).files) == 2


def test_main_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["make-checkpoint", str(tmp_path / "c.safetensors"), "--shards", "2"])
    assert info.value.code == 2 and "directory" in capsys.readouterr().err


def test_module_entry_point_without_daemon_or_numpy(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    script = (
        "import runpy, sys\n"
        "sys.argv = ['torpor.testing', 'make-checkpoint', sys.argv[1], '--layers', '8',\n"
        "            '--hidden', '256', '--shards', '2']\n"
        "try:\n"
        "    runpy.run_module('torpor.testing', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "bad = {'torpord', 'numpy', 'safetensors'} & {m.split('.')[0] for m in sys.modules}\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    ckpt = open_checkpoint(out)
    assert len(ckpt.files) == 2
    assert sum(1 for t in ckpt.tensors if t.name.startswith("model.layers.7.")) == 9
