"""The daemon decides, on real daemons: eviction under memory pressure (and
its refusal naming what blocks), Acquire sharing one wake, idle sleep, and
a caller's call winning over a policy's transition."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from torpor.testing import make_checkpoint

from .conftest import Daemon
from .engines import Worker
from .failures import RESOURCE_EXHAUSTED, fail
from .observe import settle
from .policywatch import Watch, acquire, model_bytes, one_device, state

HOLDER = Path(__file__).with_name("holder_engine.py")
LOAD = "torpor.v1.ModelService/LoadModel"
IDLE = '[policy]\ninterval = "50ms"\npreload = false\n[policy.default]\nidle_timeout = "1s"\n'


class Node:
    """A daemon with one device that fits two of `models` (and a half)."""

    def __init__(self, root: Path, config: str = "", models: str = "abc") -> None:
        """Each model has a catalogue entry."""
        self.sources = root / "sources"
        self.paths = {
            name: make_checkpoint(self.sources / name, layers=4, hidden=64, seed=i)
            for i, name in enumerate(models)
        }
        config += "".join(
            f'[[catalogue]]\nid = "{name}"\nsource = "{path}"\n'
            for name, path in self.paths.items()
        )
        self.size = model_bytes(self.sources, self.paths[models[0]])
        self.capacity = self.size * 5 // 2
        self.d = Daemon(
            root / "d",
            config=config,
            backend=one_device(self.capacity),
            roots=(self.sources,),
        )
        self.d.wait_ready()
        self.workers: list[Worker] = []

    def load(self, *names: str) -> None:
        for name in names:
            self.d.call(LOAD, {"model_id": name, "source": str(self.paths[name]), "wait": True})

    def device_used(self) -> int:
        node = self.d.call("torpor.v1.NodeService/GetNode")["node"]
        return sum(int(dev.get("used_bytes", 0)) for dev in node["devices"])

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
        self.d.kill()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def make(config: str = "", models: str = "abc") -> Node:
        node = Node(tmp_path / f"n{len(nodes)}", config, models)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.close()


def test_a_load_that_does_not_fit_evicts_the_coldest(start: Callable[..., Node]) -> None:
    n = start()
    n.load("a", "b")
    acquire(n.d, "a")  # (a use: b is colder)
    watch = Watch(n.d)
    try:
        n.load("c")
        assert settle(lambda: ("b", "CAUSE_PRESSURE") in watch.started("SLEEPING"))
        assert [m for m, _ in watch.started("SLEEPING")] == ["b"]
    finally:
        watch.close()
    b = state(n.d, "b")
    assert (b["state"], b["sleep_level"]) == ("MODEL_STATE_ASLEEP", 1)
    assert b["last_transition"]["cause"] == "CAUSE_PRESSURE"
    assert state(n.d, "c")["state"] == "MODEL_STATE_ACTIVE"
    assert n.device_used() <= n.capacity


def test_pinned_models_are_named_when_nothing_can_go(start: Callable[..., Node]) -> None:
    n = start("[policy.default]\npinned = true\n")
    n.load("a", "b")
    status = fail(n.d, "LoadModel", {"model_id": "c", "source": str(n.paths["c"]), "wait": True})
    assert (status["code"], status["reason"]) == (RESOURCE_EXHAUSTED, "OUT_OF_MEMORY")
    meta = status["metadata"]
    assert "'a'" in meta["pinned"] and "'b'" in meta["pinned"]
    assert {"asked", "free", "budget"} <= set(meta)
    listed = n.d.call("torpor.v1.ModelService/ListModels")["models"]
    assert sorted(m["model_id"] for m in listed) == ["a", "b"]  # nothing changed


def test_models_in_use_are_named_when_nothing_can_go(start: Callable[..., Node]) -> None:
    n = start()
    n.load("a", "b")
    for name in "ab":  # a router has a request running on each
        n.d.call(
            "torpor.v1.ModelService/ReportActivity",
            {"model_id": name, "reporter": "router", "in_use": 1},
        )
    status = fail(n.d, "LoadModel", {"model_id": "c", "source": str(n.paths["c"]), "wait": True})
    assert (status["code"], status["reason"]) == (RESOURCE_EXHAUSTED, "OUT_OF_MEMORY")
    assert "'a'" in status["metadata"]["in_use"] and "'b'" in status["metadata"]["in_use"]


def test_with_the_policy_layer_off_a_full_device_refuses(start: Callable[..., Node]) -> None:
    n = start("[policy]\nenabled = false\n")
    n.load("a", "b")
    status = fail(n.d, "LoadModel", {"model_id": "c", "source": str(n.paths["c"]), "wait": True})
    assert (status["code"], status["reason"]) == (RESOURCE_EXHAUSTED, "OUT_OF_MEMORY")
    assert {state(n.d, m)["state"] for m in "ab"} == {"MODEL_STATE_ACTIVE"}


def test_concurrent_acquires_share_one_wake(start: Callable[..., Node]) -> None:
    n = start()
    n.load("a")
    n.d.call("torpor.v1.ModelService/SleepModel", {"model_id": "a", "level": 2, "wait": True})
    watch = Watch(n.d)
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: acquire(n.d, "a"), range(8)))
        assert all(a["model"]["state"] == "MODEL_STATE_ACTIVE" for a in answers)
        assert not all(a.get("hit") for a in answers)  # (those that came after: hits)
        assert all("time_to_ready" in a for a in answers)
        assert settle(lambda: len(watch.started("WAKING")) >= 1)
        assert watch.started("WAKING") == [("a", "CAUSE_ACQUIRE")]  # one wake, not eight
    finally:
        watch.close()
    assert acquire(n.d, "a")["hit"] is True


def test_an_idle_model_goes_to_sleep(start: Callable[..., Node]) -> None:
    n = start(IDLE)
    n.load("a")
    assert settle(lambda: state(n.d, "a")["state"] == "MODEL_STATE_ASLEEP")
    a = state(n.d, "a")
    assert a["last_transition"]["cause"] == "CAUSE_IDLE" and a["sleep_level"] == 1


def test_a_users_wake_preempts_a_policys_sleep(start: Callable[..., Node]) -> None:
    n = start(IDLE)
    report = "torpor.v1.ModelService/ReportActivity"
    # A router is using it from before its load (its catalogue entry makes
    # it known): it can't idle until the holder engine is attached.
    n.d.call(report, {"model_id": "a", "reporter": "router", "in_use": 1})
    n.load("a")
    holder = Worker(n.d, "a", script=HOLDER)
    n.workers.append(holder)
    n.d.call(report, {"model_id": "a", "reporter": "router", "uses": 1, "in_use": 0})
    assert holder.read() == {"event": "quiesce"}  # the idle sleep waits for it
    sleeping = state(n.d, "a")
    assert sleeping["state"] == "MODEL_STATE_SLEEPING"
    assert sleeping["progress"]["cause"] == "CAUSE_IDLE"
    woken = n.d.call("torpor.v1.ModelService/WakeModel", {"model_id": "a", "wait": True})["model"]
    assert woken["state"] == "MODEL_STATE_ACTIVE"
    record = woken["last_transition"]  # the sleep, rolled back
    assert (record["kind"], record["outcome"], record["reason"], record["cause"]) == (
        "TRANSITION_KIND_SLEEP",
        "OUTCOME_ROLLED_BACK",
        "PREEMPTED",
        "CAUSE_IDLE",
    )
    holder.ask("release")


HOLD = '[policy]\nacquire_patience = "300ms"\nacquire_hold = "10m"\n'


def test_a_model_acquired_ready_is_held_against_concurrent_acquires(
    start: Callable[..., Node],
) -> None:
    n = start(HOLD)
    n.load("a", "b")
    sleep = "torpor.v1.ModelService/SleepModel"
    for name in "ab":
        n.d.call(sleep, {"model_id": name, "level": 1, "wait": True})
    n.load("c")
    n.d.call(sleep, {"model_id": "c", "level": 1, "wait": True})  # three sleepers
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        outs = dict(
            zip("abc", pool.map(lambda m: n.d.ctl("acquire", m, check=False), "abc"), strict=True)
        )
    ready = sorted(m for m, out in outs.items() if out.returncode == 0)
    refused = [out for out in outs.values() if out.returncode != 0]
    assert len(ready) == 2 and len(refused) == 1, outs  # the device fits two
    assert "RESOURCE_EXHAUSTED OUT_OF_MEMORY" in refused[0].stderr
    in_use = next(line for line in refused[0].stderr.splitlines() if "in_use:" in line)
    assert all(f"'{m}'" in in_use for m in ready)  # held, and named so
    for name in ready:  # nothing handed out as ready was evicted
        model = state(n.d, name)
        assert model["state"] == "MODEL_STATE_ACTIVE"
        assert model["last_transition"]["cause"] == "CAUSE_ACQUIRE"
        assert model["activity"].get("in_use") == 1


def test_a_load_of_a_loaded_model_sets_the_policy_it_gives(start: Callable[..., Node]) -> None:
    n = start()
    n.load("a")
    n.d.ctl("load", "a", str(n.paths["a"]), "--idle-timeout", "2m", "--priority", "7")
    policy = state(n.d, "a")["policy"]
    assert (policy["idle_timeout"], policy["priority"]) == ("120s", 7)
