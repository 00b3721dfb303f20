"""Issue 14's acceptance test, on a real daemon (host backend): six models on
a device that fits two, a loop of Acquires following a small generated trace,
engines attached to three of the models.

No Acquire fails; the device's budget is never exceeded; engines of evicted
models are quiesced and resumed, their forward passes bit-identical to the
checkpoint's; idle models go to sleep (cause IDLE), never before their
timeout; and a wake that fails (its source changed) leaves every model in a
named state.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import Daemon
from .engines import Worker, reference
from .failures import FAILED_PRECONDITION, fail
from .observe import settle
from .policywatch import Watch, acquire, model_bytes, one_device, state

torch = pytest.importorskip("torch")

from torpor.examples.tinylm import TinyConfig, make_checkpoint  # noqa: E402

ENGINE = Path(__file__).with_name("trace_engine.py")
REPORT = "torpor.v1.ModelService/ReportActivity"
SMALL = TinyConfig(layers=2, hidden=64, intermediate=176)
MODELS = [f"m{i}" for i in range(6)]
ENGINES = MODELS[:3]  # these have an engine attached
IDLE_TIMEOUT = 3.0
REQUESTS = 40
RESTING = {"MODEL_STATE_ACTIVE", "MODEL_STATE_ASLEEP", "MODEL_STATE_OFFLOADED"}
NAMED = RESTING | {"MODEL_STATE_FAILED"}


def trace(seed: int) -> list[tuple[str, float]]:
    """(model, pause after it): Zipf-like popularity, with bursts of one model
    and short gaps (the pauses are what a trace's arrivals are, not checks)."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(MODELS))]
    out: list[tuple[str, float]] = []
    while len(out) < REQUESTS:
        model = rng.choices(MODELS, weights)[0]
        for _ in range(rng.choice((1, 1, 2, 3))):  # a burst
            out.append((model, rng.choice((0.0, 0.0, 0.05, 0.2))))
    return out[:REQUESTS]


def test_six_models_on_a_device_that_fits_two(tmp_path: Path) -> None:
    sources = tmp_path / "sources"
    paths = {name: make_checkpoint(sources / name, SMALL, seed=i) for i, name in enumerate(MODELS)}
    expected = {name: reference(paths[name]) for name in ENGINES}
    size = model_bytes(sources, paths[MODELS[0]])
    capacity = size * 5 // 2
    config = (
        f'[policy]\ninterval = "100ms"\npreload = false\n'
        f'[policy.default]\nidle_timeout = "{IDLE_TIMEOUT:g}s"\n'
    )
    d = Daemon(tmp_path / "d", config=config, backend=one_device(capacity), roots=(sources,))
    workers: dict[str, Worker] = {}
    watch: Watch | None = None
    try:
        d.wait_ready()
        workers = {name: Worker(d, name, script=ENGINE) for name in ENGINES}
        for name in MODELS:
            d.call(
                "torpor.v1.ModelService/LoadModel",
                {"model_id": name, "source": str(paths[name]), "wait": True},
            )
            for _ in range(5):  # (it may have gone idle meanwhile: wake, try again)
                if name not in workers:
                    break
                # (a Wake, not an Acquire: the model is not held for a request)
                d.call("torpor.v1.ModelService/WakeModel", {"model_id": name, "wait": True})
                if workers[name].ask("attach") == {"attached": True}:
                    break
            else:
                raise AssertionError(f"the engine of {name} could not attach")
        watch = Watch(d)
        # Each Acquire's (sent, answered): it reached the daemon in between.
        uses: dict[str, list[tuple[float, float]]] = {name: [] for name in MODELS}
        answers: list[dict[str, Any]] = []

        def timed_acquire(name: str) -> dict[str, Any]:
            sent = time.time()
            answer = acquire(d, name)  # (raises if the Acquire fails)
            uses[name].append((sent, time.time()))
            return answer

        for name, pause in trace(seed=14):
            answer = timed_acquire(name)
            answers.append(answer)
            assert answer["model"]["state"] == "MODEL_STATE_ACTIVE"
            if name in workers:
                ran = workers[name].ask("run")
                for _ in range(3):  # evicted again before it ran: acquire again
                    if "digest" in ran:
                        break
                    assert ran == {"error": "WEIGHTS_NOT_READY"}, ran
                    timed_acquire(name)
                    ran = workers[name].ask("run")
                assert ran["digest"] == expected[name]
            else:  # the request served: the router says so (the Acquire's hold ends)
                d.call(REPORT, {"model_id": name, "reporter": "router", "uses": 1})
            node = d.call("torpor.v1.NodeService/GetNode")["node"]
            assert sum(int(x.get("used_bytes", 0)) for x in node["devices"]) <= capacity
            time.sleep(pause)

        # Evictions happened, engines' models among them, and the engines came back.
        evictions: dict[str, float] = {}  # each model's first eviction
        for m in watch.models():
            progress = m.get("progress", {})
            if (
                m.get("state") == "MODEL_STATE_SLEEPING"
                and progress.get("cause") == "CAUSE_PRESSURE"
            ):
                evictions.setdefault(m["model_id"], _seconds(progress["start_time"]))
        assert evictions.keys() & set(ENGINES), evictions
        assert any(not a.get("hit") for a in answers) and any(a.get("hit") for a in answers)
        for name, worker in workers.items():
            report = worker.ask("report")
            assert report["ended"] is None
            assert set(report["digests"]) == {expected[name]}  # bit-identical, every pass
            if name in evictions:
                assert report["quiesced"] > 0
                if any(sent > evictions[name] for sent, _ in uses[name]):  # wanted again
                    assert report["resumed"] > 0

        # Idle: every model ends asleep; those awake at the end went by IDLE,
        # never before their timeout since their last use.
        assert settle(lambda: all(state(d, m)["state"] == "MODEL_STATE_ASLEEP" for m in MODELS), 60)
        idle = [
            (m["model_id"], m["progress"]["start_time"])
            for m in watch.models()
            if m.get("state") == "MODEL_STATE_SLEEPING"
            and m.get("progress", {}).get("cause") == "CAUSE_IDLE"
        ]
        assert {m for m, _ in idle} >= {
            m for m in MODELS if state(d, m)["last_transition"]["cause"] == "CAUSE_IDLE"
        }
        for model_id, started in idle:
            when = _seconds(started)
            # (An Acquire answered after `when` may have come after it.)
            last = max((sent for sent, answered in uses[model_id] if answered <= when), default=0.0)
            assert when >= last + IDLE_TIMEOUT - 0.001, (model_id, when, last)

        # A wake that fails: the source of a model asleep at level 2 changed.
        victim = MODELS[-1]
        d.call("torpor.v1.ModelService/SleepModel", {"model_id": victim, "level": 2, "wait": True})
        data = bytearray(paths[victim].read_bytes())
        data[-1] ^= 0x55
        paths[victim].write_bytes(bytes(data))
        status = fail(d, "AcquireModel", {"model_id": victim})
        assert (status["code"], status["reason"]) == (FAILED_PRECONDITION, "SOURCE_CHANGED")
        states = {m: state(d, m) for m in MODELS}
        assert all(s["state"] in NAMED for s in states.values()), states
        assert (states[victim]["state"], states[victim]["state_reason"]) == (
            "MODEL_STATE_ASLEEP",
            "SOURCE_CHANGED",
        )
        for name in ENGINES:  # the others still serve
            acquire(d, name)
            assert workers[name].ask("run")["digest"] == expected[name]
    finally:
        if watch is not None:
            watch.close()
        for worker in workers.values():
            worker.kill()
        d.kill()


def _seconds(timestamp: str) -> float:
    """An RFC 3339 timestamp (grpcurl's JSON of a Timestamp), in seconds."""
    from datetime import datetime

    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
