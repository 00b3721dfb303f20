"""Spec and trace files: read as an attacker would write them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from torpord.errors import InvalidArgument
from torpord.sim.generate import Generator, generate
from torpord.sim.spec import GiB, dump_spec, load_spec, parse_spec
from torpord.sim.trace import HEADER, format_trace, load_trace, parse_trace

GOOD = b"""{"version": 1, "device": {"capacity_gib": 16}, "host": {"capacity_gib": 32},
 "bandwidth_gb_per_s": {"host_to_device": 25},
 "models": [{"id": "a", "size_gib": 8, "layers": 4}, {"id": "b", "size_gib": 2}]}"""
SECRET = "zz-secret-zz"


def spec_error(raw: bytes) -> str:
    with pytest.raises(InvalidArgument) as info:
        parse_spec(raw, "node.json")
    assert info.value.reason == "INVALID_SPEC"
    assert SECRET not in info.value.message
    return info.value.message


def test_a_spec_is_read_with_defaults() -> None:
    spec = parse_spec(GOOD, "node.json")
    assert [m.model_id for m in spec.models] == ["a", "b"]
    assert spec.models[0].size == 8 * GiB and spec.models[0].layers == 4
    assert spec.models[1].layers == 32  # the default
    assert spec.device == 16 * GiB and spec.host == 32 * GiB and spec.disk is None
    assert spec.bandwidth.host_to_device == 25e9
    assert spec.bandwidth.source_to_device == 2e9  # not given: the default


def test_a_generated_spec_reads_back() -> None:
    node, _ = generate(Generator(days=0.01, disk_gib=100.0))
    back = parse_spec(dump_spec(node).encode(), "node.json")
    assert back == node


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        (b"{", "at byte"),
        (b"[" * 100 + b"]" * 100, "nested deeper"),
        (GOOD.replace(b'"version": 1', b'"version": 2'), "version"),
        (GOOD.replace(b'"version": 1', b'"version": true'), "version"),
        (GOOD.replace(b'"size_gib": 8', b'"size_gib": -8'), "models[0].size_gib"),
        (GOOD.replace(b'"size_gib": 8', b'"size_gib": "8"'), "models[0].size_gib"),
        (GOOD.replace(b'"layers": 4', b'"layers": 0'), "models[0].layers"),
        (GOOD.replace(b'"id": "b"', b'"id": "a"'), "models[1].id"),
        (GOOD.replace(b'"id": "b"', f'"id": "../{SECRET}"'.encode()), "models[1].id"),
        (GOOD.replace(b'"host_to_device"', f'"{SECRET}"'.encode()), "bandwidth_gb_per_s"),
        (GOOD.replace(b"25}", b"0}"), "bandwidth_gb_per_s.host_to_device"),
        (GOOD.replace(b'"capacity_gib": 16', b'"capacity_gib": 4'), "device.capacity_gib"),
        (GOOD.replace(b'"models": [', b'"modelz": ['), "(top level)"),
        (b'{"version": 1, "device": {"capacity_gib": 1}, "host": {"capacity_gib": 1}}', "models"),
        (b"[1, 2]", "(top level)"),
    ],
)
def test_bad_specs_name_the_key(raw: bytes, names: str) -> None:
    assert names in spec_error(raw)


def test_a_huge_or_special_spec_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (5 * 2**20))
    with pytest.raises(InvalidArgument, match="more than"):
        load_spec(big)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # would block a plain open()+read() for ever
    with pytest.raises(InvalidArgument, match="not a regular file"):
        load_spec(fifo)
    with pytest.raises(InvalidArgument, match="cannot open"):
        load_spec(tmp_path / "missing.json")


def trace_error(text: str) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        parse_trace(text.encode(), "t.csv", ["a", "b"])
    assert info.value.reason == "INVALID_TRACE"
    assert SECRET not in info.value.message
    return info.value


def test_a_trace_is_read_and_sorted_by_arrival() -> None:
    text = f"{HEADER}\n5,a,1\n# a comment\n\n1.5, b ,2.25\n5,b,0\n"
    requests = parse_trace(text.encode(), "t.csv", ["a", "b"])
    assert [(r.arrival, r.model_id, r.duration) for r in requests] == [
        (1.5, "b", 2.25),
        (5.0, "a", 1.0),
        (5.0, "b", 0.0),  # ties keep the file's order
    ]
    assert parse_trace(format_trace(requests).encode(), "t.csv", ["a", "b"]) == requests


@pytest.mark.parametrize(
    ("text", "line", "names"),
    [
        ("model_id,arrival_seconds,duration_seconds\n1,a,1\n", 1, "header"),
        ("", 1, "header"),
        (f"{HEADER}\n1,a,1\n2,a\n", 3, "3 comma-separated fields"),
        (f"{HEADER}\n1,a,1\n2,{SECRET},1\n", 3, "model_id"),
        (f"{HEADER}\n-1,a,1\n", 2, "arrival_seconds"),
        (f"{HEADER}\nnan,a,1\n", 2, "arrival_seconds"),
        (f"{HEADER}\n1,a,inf\n", 2, "duration_seconds"),
        (f"{HEADER}\n1,a,{SECRET}\n", 2, "duration_seconds"),
        (f"{HEADER}\n1,a,1{'0' * 600}\n", 2, "at most 512 characters"),
        (f"{HEADER}\n", 2, "at least one request"),
    ],
)
def test_bad_traces_name_the_line(text: str, line: int, names: str) -> None:
    err = trace_error(text)
    assert f"t.csv line {line}:" in err.message
    assert names in err.message
    assert err.metadata["line"] == str(line)


def test_a_trace_that_is_not_utf8_names_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(HEADER.encode() + b"\n1,\xff,1\n")
    at = len(HEADER) + 3  # the header, its newline, "1,"
    with pytest.raises(InvalidArgument, match=f"not UTF-8 \\(at byte {at}\\)"):
        load_trace(path, ["a"])
