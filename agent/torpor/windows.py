"""Weekly time windows in words: "Mon-Fri 08:00-18:00", "daily 20:00-02:00",
"Sat 10:00-12:00 device lead 10m".

One parser for both sides: torpord reads windows from its config, torporctl
from `--window`, and both send the daemon offsets (`Span`), so the two can't
disagree on what a line means. The syntax is small and strict:

    WINDOW = DAYS " " HH:MM "-" HH:MM [" " TIER] [" lead " DURATION]
    DAYS   = "daily" | SPAN ("," SPAN)*      SPAN = DAY | DAY "-" DAY
    DAY    = mon | tue | wed | thu | fri | sat | sun   (any case)
    TIER   = host | device                   (default host: warm, not ready)
    DURATION = digits and a unit: "90s", "10m", "1h" (default 5m, at most 24h)

Times are UTC. A window opens on each day named, at the first time, and
closes at the second: one at or before the first ends the next day
("Fri 22:00-02:00" runs into Saturday, "Sun 22:00-02:00" into Monday,
past the week's end), and "24:00" ends one at midnight. A day range may wrap
past Sunday ("Sat-Mon"). Each day named gives one `Span`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = ["DAYS", "DEFAULT_LEAD", "MAX_LEAD", "WEEK", "Span", "format_span", "parse_window"]

DAY_SECONDS: Final = 86_400
WEEK: Final = 7 * DAY_SECONDS  # offsets count from Monday 00:00 UTC
DEFAULT_LEAD: Final = 300  # seconds before a window opens that its model is warmed
MAX_LEAD: Final = DAY_SECONDS
MAX_TEXT: Final = 200  # characters of one window's text
DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
TIERS: Final = ("host", "device")

EXAMPLE: Final = '"Mon-Fri 08:00-18:00", "daily 20:00-02:00" or "Sat 10:00-12:00 device lead 10m"'

_TIME = re.compile(r"(\d{2}):(\d{2})-(\d{2}):(\d{2})")
_DURATION = re.compile(r"(\d{1,6})(s|m|h)")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600}


@dataclass(frozen=True)
class Span:
    """One window on one day: seconds since Monday 00:00 UTC. `start` is in
    [0, WEEK); so is `end`, which is below `start` when the window runs
    past the week's end."""

    start: int
    end: int
    tier: str = "host"  # one of TIERS
    lead: int = DEFAULT_LEAD  # seconds

    @property
    def length(self) -> int:
        return (self.end - self.start) % WEEK or WEEK


def parse_window(text: str) -> tuple[Span, ...]:
    """The spans a window's text names, one per day; ValueError saying what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"expected a window like {EXAMPLE}")
    if len(text) > MAX_TEXT:
        raise ValueError(f"a window is at most {MAX_TEXT} characters, got {len(text)}")
    words = text.split()
    if len(words) < 2:
        raise ValueError(f"expected days and a time range, like {EXAMPLE}")
    days = _days(words[0])
    start, length = _times(words[1])
    tier, lead, rest = "host", DEFAULT_LEAD, words[2:]
    if rest and rest[0].lower() in TIERS:
        tier, rest = rest[0].lower(), rest[1:]
    if rest and rest[0].lower() == "lead":
        if len(rest) < 2:
            raise ValueError('"lead" needs a duration, like "lead 10m"')
        lead, rest = _lead(rest[1].lower()), rest[2:]
    if rest:
        raise ValueError(
            f'unexpected "{rest[0]}" (after the time range: "host" or "device",'
            ' then "lead" and a duration)'
        )
    return tuple(
        Span(
            start=day * DAY_SECONDS + start,
            end=(day * DAY_SECONDS + start + length) % WEEK,
            tier=tier,
            lead=lead,
        )
        for day in days
    )


def _day(word: str) -> int:
    if word.lower() not in DAYS:
        raise ValueError(f'unknown day "{word}" (days are Mon Tue Wed Thu Fri Sat Sun, or "daily")')
    return DAYS.index(word.lower())


def _days(word: str) -> list[int]:
    if word.lower() == "daily":
        return list(range(7))
    days: list[int] = []
    for part in word.split(","):
        first, dash, last = part.partition("-")
        lo = _day(first)
        hi = _day(last) if dash else lo
        if dash and hi == lo:
            raise ValueError(f'"{part}": a range names two different days')
        span = [(lo + i) % 7 for i in range((hi - lo) % 7 + 1)]  # may wrap past Sunday
        for day in span:
            if day in days:
                raise ValueError(f'{DAYS[day].capitalize()} is named twice in "{word}"')
            days.append(day)
    return days


def _times(word: str) -> tuple[int, int]:
    """(start, length) in seconds."""
    match = _TIME.fullmatch(word)
    if match is None:
        raise ValueError(f'expected a time range like "08:00-18:00" (UTC), got "{word}"')
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or m1 > 59:
        raise ValueError(f'"{word}": the start must be 00:00 to 23:59')
    if not (h2 <= 23 and m2 <= 59) and (h2, m2) != (24, 0):
        raise ValueError(f'"{word}": the end must be 00:00 to 23:59, or 24:00')
    start, end = (h1 * 60 + m1) * 60, (h2 * 60 + m2) * 60
    if end == start:
        raise ValueError(f'"{word}": the window is empty (it ends when it starts)')
    return start, (end - start) % DAY_SECONDS or DAY_SECONDS


def _lead(word: str) -> int:
    match = _DURATION.fullmatch(word)
    if match is None:
        raise ValueError(f'expected a lead like "10m", "90s" or "1h", got "{word}"')
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds > MAX_LEAD:
        raise ValueError(f'"lead {word}" is more than {MAX_LEAD // 3600}h')
    return seconds


def format_span(span: Span) -> str:
    """A span in the parser's words: `Mon 08:00-18:00 host lead 5m`; one
    longer than a day names the day it ends: `Mon 08:00-Wed 18:00 ...`."""
    day, start = divmod(span.start, DAY_SECONDS)
    end_day, end = divmod((span.start + span.length) % WEEK, DAY_SECONDS)

    def clock(seconds: int) -> str:
        text = f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}"
        return text + (f":{seconds % 60:02d}" if seconds % 60 else "")

    if span.length > DAY_SECONDS:
        end_text = f"{DAYS[end_day].capitalize()} {clock(end)}"
    else:
        end_text = "24:00" if end == 0 else clock(end)
    text = f"{DAYS[day].capitalize()} {clock(start)}-{end_text} {span.tier}"
    lead = span.lead
    unit = next(u for u, n in (("h", 3600), ("m", 60), ("s", 1)) if lead % n == 0)
    return f"{text} lead {lead // _UNITS[unit]}{unit}"
