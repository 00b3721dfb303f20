"""Traces: `arrival_seconds,model_id,duration_seconds`, one request a line.

A header line naming those three columns is required (so a file with its
columns swapped is caught, not replayed). Arrivals are seconds since the
trace's start; lines need not be sorted (they are replayed in order of
arrival, ties in file order). Errors name the file and the line, never the
line's content.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torpord.errors import InvalidArgument
from torpord.sim.spec import read_bounded

__all__ = ["HEADER", "MAX_TRACE_BYTES", "Request", "format_trace", "load_trace", "parse_trace"]

HEADER = "arrival_seconds,model_id,duration_seconds"
MAX_TRACE_BYTES = 512 * 2**20
MAX_LINE = 512
MAX_SECONDS = 10 * 366 * 86400.0  # ten years of trace


@dataclass(frozen=True)
class Request:
    arrival: float  # seconds since the trace's start
    model_id: str
    duration: float  # seconds the request uses the model once it is ready


def _bad(where: str, line: int, expected: str) -> InvalidArgument:
    return InvalidArgument(
        f"{where} line {line}: expected {expected}",
        reason="INVALID_TRACE",
        metadata={"file": where, "line": line},
    )


def _seconds(where: str, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= MAX_SECONDS):
        raise _bad(where, line, f"{column}: a number of seconds from 0 to {MAX_SECONDS:g}")
    return value


def parse_trace(raw: bytes, where: str, models: Iterable[str]) -> list[Request]:
    """The requests of a trace file's bytes, sorted by arrival; every
    model_id must be one of `models`."""
    known = set(models)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidArgument(
            f"{where}: not UTF-8 (at byte {err.start})",
            reason="INVALID_TRACE",
            metadata={"file": where, "offset": err.start},
        ) from None
    lines = text.splitlines()
    if not lines or lines[0].strip().replace(" ", "") != HEADER:
        raise _bad(where, 1, f"the header {HEADER}")
    out: list[Request] = []
    for number, line in enumerate(lines[1:], start=2):
        if len(line) > MAX_LINE:
            raise _bad(where, number, f"a line of at most {MAX_LINE} characters")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3:
            raise _bad(where, number, f"3 comma-separated fields (got {len(fields)})")
        arrival = _seconds(where, number, "arrival_seconds", fields[0])
        if fields[1] not in known:
            raise _bad(where, number, "model_id: one of the spec's model ids")
        duration = _seconds(where, number, "duration_seconds", fields[2])
        out.append(Request(arrival, fields[1], duration))
    if not out:
        raise _bad(where, len(lines) + 1, "at least one request")
    out.sort(key=lambda r: r.arrival)  # stable: ties keep file order
    return out


def load_trace(path: Path, models: Iterable[str]) -> list[Request]:
    return parse_trace(read_bounded(path, MAX_TRACE_BYTES, "trace"), str(path), models)


def format_trace(requests: Sequence[Request]) -> str:
    rows = [HEADER]
    rows.extend(f"{r.arrival:.3f},{r.model_id},{r.duration:.3f}" for r in requests)
    return "\n".join(rows) + "\n"
