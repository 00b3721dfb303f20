"""torpor.windows: the weekly window syntax shared by the config and torporctl."""

from __future__ import annotations

import pytest
from torpor.windows import DAY_SECONDS, WEEK, Span, format_span, parse_window

H = 3600


def test_a_day_range_gives_one_span_per_day() -> None:
    spans = parse_window("Mon-Fri 08:00-18:00")
    assert [s.start for s in spans] == [d * DAY_SECONDS + 8 * H for d in range(5)]
    assert all(s.length == 10 * H and s.tier == "host" and s.lead == 300 for s in spans)


def test_a_window_past_midnight_ends_the_next_day_and_sunday_wraps_to_monday() -> None:
    spans = parse_window("daily 20:00-02:00")
    assert len(spans) == 7
    assert spans[0] == Span(20 * H, DAY_SECONDS + 2 * H)
    sunday = spans[6]
    assert sunday.start == 6 * DAY_SECONDS + 20 * H
    assert sunday.end == 2 * H  # past the week's end: end < start
    assert sunday.length == 6 * H


def test_a_day_range_may_wrap_past_sunday() -> None:
    spans = parse_window("Sat-Mon 10:00-12:00")
    assert [s.start // DAY_SECONDS for s in spans] == [5, 6, 0]


def test_24_00_ends_a_window_at_midnight_and_a_full_day_is_allowed() -> None:
    (span,) = parse_window("Sun 22:00-24:00")
    assert (span.start, span.end, span.length) == (WEEK - 2 * H, 0, 2 * H)
    (day,) = parse_window("Wed 00:00-24:00")
    assert day.length == DAY_SECONDS


def test_tier_lead_lists_and_case() -> None:
    spans = parse_window("mon,THU 10:00-12:00 DEVICE Lead 10m")
    assert [s.start // DAY_SECONDS for s in spans] == [0, 3]
    assert all(s.tier == "device" and s.lead == 600 for s in spans)
    assert parse_window("Sat 10:00-12:00 lead 1h")[0].lead == H
    assert parse_window("Sat 10:00-12:00 lead 0s")[0].lead == 0


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("Mon-Fry 08:00-18:00", 'unknown day "Fry"'),
        ("Monday 08:00-18:00", 'unknown day "Monday"'),
        ("Mon 8:00-18:00", 'time range like "08:00-18:00"'),
        ("Mon 08:00", 'time range like "08:00-18:00"'),
        ("Mon 24:00-02:00", "the start must be 00:00 to 23:59"),
        ("Mon 10:60-11:00", "the start must be 00:00 to 23:59"),
        ("Mon 10:00-24:01", "the end must be 00:00 to 23:59, or 24:00"),
        ("Mon 10:00-25:00", "the end must be 00:00 to 23:59, or 24:00"),
        ("Mon 10:00-10:00", "the window is empty"),
        ("Mon,Mon 10:00-11:00", "Mon is named twice"),
        ("Mon-Tue,Tue 10:00-11:00", "Tue is named twice"),
        ("Mon-Mon 10:00-11:00", "a range names two different days"),
        ("Mon 10:00-11:00 gpu", 'unexpected "gpu"'),
        ("Mon 10:00-11:00 lead", '"lead" needs a duration'),
        ("Mon 10:00-11:00 lead soon", 'a lead like "10m"'),
        ("Mon 10:00-11:00 lead 25h", "more than 24h"),
        ("Mon 10:00-11:00 lead 10m device", 'unexpected "device"'),
        ("daily", "expected days and a time range"),
        ("", "expected days and a time range"),
        ("Mon " + "x" * 300, "at most 200 characters"),
    ],
)
def test_bad_windows_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_window(text)
    assert says in str(info.value)


def test_format_span_reads_back_as_the_same_span() -> None:
    for text in ("Mon 08:00-18:00", "Sun 20:00-02:00 device lead 10m", "Fri 22:00-24:00 lead 90s"):
        for span in parse_window(text):
            assert parse_window(format_span(span)) == (span,)
    longer = Span(H, 2 * DAY_SECONDS + 60, "device", 90)
    assert format_span(longer) == "Mon 01:00-Wed 00:01 device lead 90s"
