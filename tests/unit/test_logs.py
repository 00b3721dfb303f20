"""torpord.logs: JSON lines or console, stdlib records through the same processors."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime

import pytest
from torpord.logs import configure_logging, get_logger


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Leave the root logger and structlog as they were for other tests."""
    import structlog

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    structlog.reset_defaults()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_lines_carry_timestamp_level_logger_event_and_fields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info", "json")
    get_logger("torpord.test").info("model loaded", model_id="m1", bytes=42)
    (record,) = json_lines(capsys.readouterr().err)
    assert record["event"] == "model loaded"
    assert record["level"] == "info"
    assert record["logger"] == "torpord.test"
    assert record["model_id"] == "m1"
    assert record["bytes"] == 42
    stamp = datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00"))
    assert stamp.tzinfo is not None


def test_stdlib_records_go_through_the_same_processors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info", "json")
    logging.getLogger("grpc._server").warning("handler %s failed", "Load")
    (record,) = json_lines(capsys.readouterr().err)
    assert record["event"] == "handler Load failed"
    assert record["level"] == "warning"
    assert record["logger"] == "grpc._server"
    assert "timestamp" in record


def test_level_filters_both_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("warning", "json")
    get_logger("torpord.test").info("hidden")
    logging.getLogger("asyncio").info("hidden too")
    get_logger("torpord.test").error("shown")
    assert [r["event"] for r in json_lines(capsys.readouterr().err)] == ["shown"]


def test_exceptions_are_rendered_as_text_in_json(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    try:
        raise RuntimeError("kaput")
    except RuntimeError:
        get_logger("torpord.test").exception("transition failed")
    (record,) = json_lines(capsys.readouterr().err)
    assert "RuntimeError: kaput" in str(record["exception"])


def test_console_format_is_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("debug", "console")
    get_logger("torpord.test").debug("waking", model_id="m1")
    err = capsys.readouterr().err
    assert "waking" in err
    assert "model_id=m1" in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err.splitlines()[0])


def test_auto_is_json_when_stderr_is_not_a_tty(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info", "auto")  # pytest's captured stderr is no TTY
    get_logger("torpord.test").info("hello")
    assert json_lines(capsys.readouterr().err)[0]["event"] == "hello"


def test_auto_is_console_on_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    tty = _Tty()
    monkeypatch.setattr("sys.stderr", tty)
    configure_logging("info", "auto")
    get_logger("torpord.test").info("hello", a=1)
    line = tty.getvalue().splitlines()[0]
    assert "hello" in line
    assert not line.startswith("{")


def test_configuring_twice_keeps_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "console")
    configure_logging("info", "json")
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "torpord"]
    assert len(ours) == 1
    get_logger("torpord.test").info("once")
    assert len(json_lines(capsys.readouterr().err)) == 1


def test_loggers_made_before_configuring_follow_the_configuration(
    capsys: pytest.CaptureFixture[str],
) -> None:
    early = get_logger("torpord.early")
    configure_logging("info", "json")
    early.info("first")
    configure_logging("error", "json")
    early.info("filtered now")
    assert [r["event"] for r in json_lines(capsys.readouterr().err)] == ["first"]


def test_bound_values_are_kept(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    get_logger("torpord.test", request_id="r1").bind(model_id="m").info("go")
    (record,) = json_lines(capsys.readouterr().err)
    assert (record["request_id"], record["model_id"]) == ("r1", "m")


@pytest.mark.parametrize(("level", "fmt"), [("loud", "json"), ("info", "xml"), ("INFO", "json")])
def test_bad_arguments(level: str, fmt: str) -> None:
    with pytest.raises(ValueError):
        configure_logging(level, fmt)
