"""Logging: structlog for our code, the same processors for everyone else's.

Every record, ours or a library's (grpc, asyncio), goes through one stdlib
handler on the root logger whose `structlog.stdlib.ProcessorFormatter` renders
it: JSON lines for the journal and log shippers, or structlog's console
renderer for a person at a terminal. Routing our own events through stdlib
too (rather than structlog printing directly) is what gives both kinds one
level filter, one output stream and one format.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import Processor

__all__ = ["FORMATS", "LEVELS", "configure_logging", "get_logger"]

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("auto", "json", "console")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time of each record.

    Binding the stream once would keep writing to a closed or replaced stream
    after a test harness (or a daemoniser) swaps sys.stderr.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass  # always sys.stderr; see the class docstring


def _shared_processors() -> list[Processor]:
    """What both structlog events and foreign stdlib records get before rendering."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def configure_logging(level: str, fmt: str) -> None:
    """Send all logging to stderr at `level` (debug|info|warning|error) in `fmt`.

    `fmt` is "json", "console", or "auto": console when stderr is a terminal,
    JSON lines otherwise (under systemd, stderr is the journal). Calling it
    again replaces the previous setup rather than adding a second handler.
    """
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "auto":
        fmt = "console" if _isatty(sys.stderr) else "json"

    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        # JSON needs the traceback as a string; the console renderer formats
        # exc_info itself (and warns if it has already been turned into text).
        tail: list[Processor] = [structlog.processors.format_exc_info]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(sys.stderr))
        tail = []

    shared = _shared_processors()
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail, renderer],
    )
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    handler.set_name("torpord")

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.UnicodeDecoder(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: module-level loggers created (or first used) before
        # configure_logging must pick up this configuration, not freeze the
        # defaults. Rendering happens in the handler anyway, so the per-call
        # cost of an uncached logger is only assembling its processor chain.
        cache_logger_on_first_use=False,
    )


def get_logger(name: str, **initial_values: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger named `name` (use the module's `__name__`)."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name, **initial_values)
    return logger


def _isatty(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False
