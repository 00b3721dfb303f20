"""The engine on tiny traces whose outcomes are computed by hand.

Decisions come from tests/sim/standin.py (LRU, level-2 drops, idle sleep)
so that these figures stay put whatever the real policies decide; the
activity is the real torpord.policies.activity.Activity.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from torpord.policies.actions import Action, Load, Refusal, Sleep
from torpord.policies.activity import Activity
from torpord.policies.settings import ModelPolicy, PolicySettings
from torpord.policies.view import Bandwidth, NodeView
from torpord.sim.engine import DEFAULT_ROUTER, Decisions, Outcome, Router, simulate
from torpord.sim.node import PolicyViolation, SimNode
from torpord.sim.spec import GiB, ModelSpec, NodeSpec
from torpord.sim.trace import Request
from torpord.types import Cause, ModelState, Tier

from tests.sim import standin

BW = Bandwidth(host_to_device=20e9, device_to_host=10e9, disk_to_device=3e9, source_to_device=2e9)
NEVER = PolicySettings(default=ModelPolicy(idle_timeout=0.0))


def node(sizes: dict[str, float], device: float, host: float = 64) -> NodeSpec:
    models = tuple(ModelSpec(k, round(v * GiB), 4) for k, v in sizes.items())
    return NodeSpec(models, round(device * GiB), round(host * GiB), None, BW, start=1e6)


def run(
    spec: NodeSpec,
    trace: Sequence[tuple[float, str, float]],
    settings: PolicySettings = NEVER,
    decisions: Decisions = standin,
    load_everything: bool = False,
    router: Router = DEFAULT_ROUTER,
) -> Outcome:
    requests = [Request(*r) for r in trace]
    return simulate(
        "test",
        spec,
        requests,
        settings,
        decisions=decisions,
        activity=Activity,
        tick=10.0,
        load_everything=load_everything,
        router=router,
    )


def test_load_then_idle_sleep_then_wake_take_bytes_over_bandwidth() -> None:
    size = 8 * GiB
    idle = PolicySettings(default=ModelPolicy(idle_timeout=60.0, idle_level=1))
    out = run(node({"a": 8}, 10), [(0, "a", 1), (1000, "a", 1)], idle)
    load, wake = size / BW.source_to_device, size / BW.host_to_device
    assert out.ready == pytest.approx([load, wake])
    assert (out.hits, out.loads, out.wakes, out.idle_sleeps, out.evictions) == (0, 1, 1, 1, 0)
    # On the device from the Load (t=0) to the idle tick after load + 1 s + 60 s
    # (t=70), and from the wake (t=1000) to the last tick (t=1010).
    assert out.device_byte_seconds == pytest.approx(size * (70 + 10))
    assert out.seconds == pytest.approx(1010)


def test_concurrent_requests_share_one_transition() -> None:
    out = run(node({"a": 8}, 10), [(0, "a", 1), (0.5, "a", 1), (1, "a", 1), (100, "a", 1)])
    load = 8 * GiB / BW.source_to_device
    assert out.loads == 1
    assert out.ready == pytest.approx([load, load - 0.5, load - 1, 0])
    assert out.hits == 1


def test_no_oversubscription_hits_every_request() -> None:
    spec = node({"a": 8, "b": 4, "c": 2}, 14)
    trace = [(t, "abc"[t % 3], 2) for t in range(0, 300, 7)]
    out = run(spec, trace, load_everything=True)
    assert out.hits == out.requests == len(trace)
    assert set(out.ready) == {0.0}
    assert out.loads == out.wakes == out.evictions == 0
    assert out.device_byte_seconds == pytest.approx(14 * GiB * out.seconds)


def test_transfers_on_one_link_run_one_after_the_other() -> None:
    out = run(node({"a": 4, "b": 4}, 8), [(0, "a", 1), (0, "b", 1)])
    load = 4 * GiB / BW.source_to_device
    assert out.ready == pytest.approx([load, 2 * load])  # one source, read in turn


def test_room_is_made_before_the_load() -> None:
    out = run(node({"a": 4, "b": 4}, 4), [(0, "a", 1), (100, "b", 1), (200, "a", 1)])
    load = 4 * GiB / BW.source_to_device
    assert out.evictions == 2  # a for b, b for a
    # The stand-in drops to level 2: a comes back from its source.
    assert out.ready == pytest.approx([load, load, load])
    assert (out.loads, out.wakes) == (2, 1)


def test_a_request_that_gets_room_within_the_patience_is_not_refused() -> None:
    out = run(node({"a": 4, "b": 4}, 4), [(0, "a", 3), (1, "b", 1)])
    load = 4 * GiB / BW.source_to_device
    # b finds a loading, then in use; it waits (patience 5 s, until t=6) and
    # gets room when a ends (load + 3 < 6).
    assert out.ready == pytest.approx([load, (load + 3 - 1) + load])
    assert (out.refusals, out.refused, out.unserved) == (0, 0, 0)


@pytest.mark.parametrize(
    ("router", "refusals", "served"),
    [
        # Patience 5 s from t=1, 7, 13, ...: refused at t=6, 12, ..., 102
        # (17 times), just before a ends (load + 100); served on the retry
        # at t=103.
        (Router(), 17, 103),
        # Patience 10 s, retry after 2 s: waits from t=1, 13, ..., 97 (the
        # 8 refusals at t=11, 23, ..., 95), and a ends within the last wait.
        (Router(patience=10, retry_after=2), 8, 100 + 4 * GiB / BW.source_to_device),
    ],
)
def test_a_request_that_waits_past_the_patience_is_refused_and_retried(
    router: Router, refusals: int, served: float
) -> None:
    out = run(node({"a": 4, "b": 4}, 4), [(0, "a", 100), (1, "b", 1)], router=router)
    load = 4 * GiB / BW.source_to_device
    # Its time to ready runs from its arrival (t=1), retries included.
    assert out.ready == pytest.approx([load, served + load - 1])
    assert (out.refusals, out.refused, out.unserved, out.hits) == (refusals, 1, 0, 0)


class Recorder:
    """The stand-in's decisions, keeping each view acquire was asked with."""

    def __init__(self) -> None:
        self.views: list[tuple[str, NodeView]] = []

    def acquire(self, view: NodeView, model_id: str) -> Sequence[Action] | Refusal:
        self.views.append((model_id, view))
        return standin.acquire(view, model_id)

    def housekeeping(self, view: NodeView) -> Sequence[Action]:
        return standin.housekeeping(view)


def test_each_acquire_of_a_retried_request_is_a_use() -> None:
    recorder = Recorder()
    spec = node({"a": 4, "b": 4}, 4)
    run(spec, [(0, "a", 100), (1, "b", 1)], decisions=recorder)
    last = [view for model_id, view in recorder.views if model_id == "b"][-1]
    b = last.model("b")
    assert b is not None
    assert b.activity.uses == 18  # the arrival and 17 retries


def test_policies_see_requests_in_flight_and_transitions() -> None:
    recorder = Recorder()
    spec = node({"a": 4, "b": 4, "c": 4}, 12)
    run(spec, [(0, "a", 100), (0.5, "b", 1), (50, "c", 1)], decisions=recorder)
    asked = {model_id: view for model_id, view in recorder.views}
    during_load = asked["b"].model("a")
    assert during_load is not None
    assert during_load.busy and during_load.state is ModelState.LOADING
    assert during_load.bytes_in(Tier.DEVICE) == 4 * GiB  # committed: already counted there
    in_use = asked["c"].model("a")
    assert in_use is not None and not in_use.busy and in_use.state is ModelState.ACTIVE
    assert in_use.activity.in_use == 1
    assert in_use.activity.uses == 1  # the Acquire (the request's use is still open)
    assert asked["c"].devices["sim-gpu0"].used == 8 * GiB
    assert asked["c"].now == spec.start + 50


class Refuser:
    def acquire(self, view: NodeView, model_id: str) -> Sequence[Action] | Refusal:
        return Refusal("sim-gpu0", 1, 1, {})

    def housekeeping(self, view: NodeView) -> Sequence[Action]:
        return ()


def test_requests_refused_for_ever_are_unserved_and_the_run_ends() -> None:
    out = run(node({"a": 4}, 4), [(0, "a", 1), (5, "a", 1)], decisions=Refuser())
    assert out.unserved == 2 and out.ready == []
    # Nothing to wait for: refused at once, at t=0, 1, ..., 4 (the router
    # retries while requests are to come), then both at t=5, for good.
    assert (out.refusals, out.refused) == (7, 2)


class Evictor:
    """Makes room by evicting whatever is on the device, in use or not."""

    def acquire(self, view: NodeView, model_id: str) -> Sequence[Action] | Refusal:
        victims = [
            Sleep(m.model_id, 2, Cause.PRESSURE)
            for m in view.models
            if m.model_id != model_id and m.bytes_in(Tier.DEVICE)
        ]
        return [*victims, Load(model_id, "", Tier.DEVICE, Cause.ACQUIRE)]

    def housekeeping(self, view: NodeView) -> Sequence[Action]:
        return ()


class Overfiller(Evictor):
    def acquire(self, view: NodeView, model_id: str) -> Sequence[Action] | Refusal:
        return [Load(model_id, "", Tier.DEVICE, Cause.ACQUIRE)]


@pytest.mark.parametrize(
    ("decisions", "says"),
    [(Evictor(), "Sleep\\(a, PRESSURE\\): the model is in use"), (Overfiller(), "DEVICE would")],
)
def test_an_action_the_daemon_would_refuse_stops_the_run(decisions: Decisions, says: str) -> None:
    with pytest.raises(PolicyViolation, match=says):
        run(node({"a": 4, "b": 4}, 4), [(0, "a", 100), (10, "b", 1)], decisions=decisions)


def test_a_level_1_sleep_of_a_level_2_sleeper_reads_it_into_host_memory() -> None:
    spec = node({"a": 8}, 10)
    sim = SimNode(spec, NEVER, Activity)
    a = sim.models["a"]
    sim.done(sim.commit(Load("a", "", Tier.DEVICE, Cause.USER)), 0.0)
    sim.done(sim.commit(Sleep("a", 2, Cause.USER)), 1.0)
    assert (a.level, sim.used[Tier.HOST]) == (2, 0)
    lift = sim.commit(Sleep("a", 1, Cause.SCHEDULE))
    assert (lift.link, lift.seconds) == ("source", pytest.approx(8 * GiB / BW.source_to_device))
    sim.done(lift, 2.0)
    assert (a.state, a.level, sim.used[Tier.HOST], sim.used[Tier.DEVICE]) == (
        ModelState.ASLEEP,
        1,
        8 * GiB,
        0,
    )
    with pytest.raises(PolicyViolation, match="can't sleep at that level"):
        sim.commit(Sleep("a", 1, Cause.SCHEDULE))  # (level 1 already)
