"""torporctl acquire / register / policy flags against the fake daemon: what
is sent and what is printed (the real daemon: tests/e2e/test_cli_catalogue.py)."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2
from torpor.v1 import common_pb2, models_pb2

from .fake_daemon import Daemon


@pytest.fixture
def daemon_models() -> dict[str, common_pb2.Model]:
    return {
        "hot": common_pb2.Model(model_id="hot", state=common_pb2.MODEL_STATE_ACTIVE),
        "cold": common_pb2.Model(
            model_id="cold", state=common_pb2.MODEL_STATE_ASLEEP, sleep_level=1
        ),
    }


def test_acquire_says_hit_or_miss_and_time_to_ready(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    assert daemon.run("acquire", "hot") == 0
    assert capsys.readouterr().out == "hit: 'hot' was active, ready at once\n"
    assert daemon.run("acquire", "cold", "--request-id", "r1") == 0
    assert capsys.readouterr().out == "miss: 'cold' is active, ready in 1.5s\n"
    assert daemon.models.requests[-1] == models_pb2.AcquireModelRequest(
        model_id="cold", request_id="r1"
    )


def test_load_sends_only_the_policy_fields_given(daemon: Daemon) -> None:
    assert daemon.run("load", "a", "/m/a") == 0
    assert not daemon.models.requests[-1].HasField("policy")  # type: ignore[attr-defined]
    argv = ["load", "b", "/m/b", "--idle-timeout", "5m", "--priority", "-3", "--unpin"]
    argv += ["--evict-to", "source", "--window", "Sun 22:00-02:00 device lead 90s"]
    assert daemon.run(*argv) == 0
    policy = daemon.models.requests[-1].policy  # type: ignore[attr-defined]
    assert policy == common_pb2.Policy(
        idle_timeout=duration_pb2.Duration(seconds=300),
        priority=-3,
        pinned=False,
        evict_to=common_pb2.TIER_SOURCE,
        windows=[
            common_pb2.Window(
                start=duration_pb2.Duration(seconds=6 * 86400 + 22 * 3600),
                end=duration_pb2.Duration(seconds=2 * 3600),
                tier=common_pb2.TIER_DEVICE,
                lead=duration_pb2.Duration(seconds=90),
            )
        ],
    )
    assert policy.HasField("pinned") and not policy.HasField("idle_level")


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--window", "Mon-Fry 08:00-18:00"], 'unknown day "Fry"'),
        (["--idle-timeout", "soon"], 'expected a duration like "5m"'),
        (["--idle-level", "3"], "invalid choice: 3"),
        (["--pin", "--unpin"], "not allowed with argument --pin"),
        (["--evict-to", "device"], "invalid choice: 'device'"),
    ],
)
def test_bad_policy_flags_are_usage_errors(
    daemon: Daemon, capsys: pytest.CaptureFixture[str], flags: list[str], says: str
) -> None:
    assert daemon.run("policy", "hot", *flags) == 2
    assert says in capsys.readouterr().err
    assert daemon.models.requests == []


def test_acquire_of_an_unknown_model_is_reported(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    assert daemon.run("acquire", "nope") == 1
    assert "(NOT_FOUND MODEL_NOT_FOUND)" in capsys.readouterr().err
