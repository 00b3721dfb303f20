"""The bounded JSON reader: limits checked before parsing, no input echoed."""

from __future__ import annotations

import pytest
from torpor.boundedjson import BoundedJSONError, depth, loads


def test_parses_plain_json() -> None:
    assert loads(b'{"a": [1, {"b": "c"}]}', max_bytes=100, max_depth=3) == {"a": [1, {"b": "c"}]}
    assert depth(b'{"a": [1, {"b": "[[[[{{{"}]}', 10) == 3  # brackets in strings don't count


@pytest.mark.parametrize("nesting", [33, 1_000, 100_000])
def test_too_deep_is_refused_before_parsing(nesting: int) -> None:
    raw = b"[" * nesting + b"]" * nesting
    with pytest.raises(BoundedJSONError, match="nested deeper than 32 levels") as info:
        loads(raw, max_bytes=len(raw), max_depth=32)
    assert info.value.offset == 32


def test_too_large_is_refused() -> None:
    with pytest.raises(BoundedJSONError, match="11 bytes, more than the 10 allowed"):
        loads(b'"abcdefghi"', max_bytes=10, max_depth=1)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b'{"secret-key": 1, "secret-key": 2}', "same key twice"),
        (b'{"secret-value": NaN}', "NaN and Infinity"),
        (b'{"secret-value": tru}', "not valid JSON at byte 17"),
        (b'{"secret-\xff": 1}', "not UTF-8 (at byte 9)"),
    ],
)
def test_errors_name_positions_never_content(raw: bytes, words: str) -> None:
    with pytest.raises(BoundedJSONError) as info:
        loads(raw, max_bytes=1000, max_depth=4)
    assert words in str(info.value)
    assert "secret" not in str(info.value)


def test_unterminated_strings_scan_in_one_pass() -> None:
    # Each quote opens a string that never closes: a scanner that retried from
    # every quote would take hours over this (pytest's timeout would stop it).
    raw = b'"' + b'\\"' * 500_000
    assert depth(raw, 4) == 0
