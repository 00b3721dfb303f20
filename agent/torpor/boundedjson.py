"""JSON from files and sockets, parsed within bounds set before parsing.

Everything the daemon parses as JSON (a checkpoint's index, a disk cache
entry's meta, an fd-socket request) comes from someone who may be hostile;
it lives in `torpor` so the fd socket's two ends (torpor.fdwire) share it.
`loads` refuses input over `max_bytes` and nesting deeper than `max_depth`
before the parser sees it (so no RecursionError, no deep recursion at all),
rejects NaN/Infinity and duplicate keys, and says what is wrong with a
position only: its messages never quote the input, which may be a file the
caller could not read.
"""

from __future__ import annotations

import json
import re
from typing import NoReturn

__all__ = ["BoundedJSONError", "loads"]

# A JSON string (escapes included) and the brackets outside strings. Strings
# are matched first so a bracket inside one is skipped with it.
# A string left open runs to the end (possessively: one pass, no retries).
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*+(?:"|\Z)|[\[\]{}]', re.DOTALL)


class BoundedJSONError(ValueError):
    """The input is too large, too deep, or not valid JSON; `offset` is the
    byte position where that was found (None when it is about the whole)."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


def _fail(message: str, offset: int | None = None) -> NoReturn:
    raise BoundedJSONError(message, offset)


def _reject_constant(name: str) -> NoReturn:
    raise ValueError("NaN and Infinity are not JSON")


def _unique_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("an object has the same key twice")
    return out


def depth(raw: bytes, limit: int) -> int:
    """The nesting depth of `raw` (0 for a scalar), counting no further than
    `limit + 1`; raises BoundedJSONError at the first byte past `limit`."""
    level = deepest = 0
    for match in _TOKENS.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            level += 1
            if level > limit:
                _fail(f"nested deeper than {limit} levels (at byte {match.start()})", match.start())
            deepest = max(deepest, level)
        elif token in (b"]", b"}"):
            level -= 1
    return deepest


def loads(raw: bytes, *, max_bytes: int, max_depth: int) -> object:
    """Parse UTF-8 JSON `raw` within the bounds; BoundedJSONError otherwise."""
    if len(raw) > max_bytes:
        _fail(f"{len(raw)} bytes, more than the {max_bytes} allowed")
    depth(raw, max_depth)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        _fail(f"not UTF-8 (at byte {err.start})", err.start)
    try:
        return json.loads(text, object_pairs_hook=_unique_object, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        at = len(text[: err.pos].encode())
        # err.msg is json's own wording ("Expecting ',' delimiter"): no input in it.
        _fail(f"not valid JSON at byte {at}: {err.msg}", at)
    except (ValueError, RecursionError) as err:
        # Our hooks' messages (duplicate key, NaN) quote nothing either.
        _fail(f"not valid JSON: {err}")
