"""The catalogue and per-model policies in the manager: resolution order
(request over entry over defaults), Register/Deregister, SetModelPolicy,
registered models listed as UNLOADED, bounds and INVALID_POLICY."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from torpor.testing import make_checkpoint
from torpord.backends.host import HostBackend
from torpord.config.policy import MODEL_ID_PATTERN
from torpord.core.catalogue import Catalogue, Entry
from torpord.core.events import EventType
from torpord.core.manager import ManagerSettings, ModelManager
from torpord.core.policy import PolicyOverrides, check_policy
from torpord.core.registry import MODEL_ID
from torpord.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TorporError,
)
from torpord.policies.settings import ModelPolicy, PolicySettings, Window
from torpord.types import ModelState, Tier

MiB = 2**20
DEFAULT = ModelPolicy(idle_timeout=600.0, idle_level=2, priority=1)


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[ModelManager]:
    backend = HostBackend(devices=2, device_capacity=64 * MiB, host_capacity=64 * MiB)
    entry = Entry("listed", str(tmp_path / "listed"), "", ModelPolicy(priority=7, pinned=True))
    settings = ManagerSettings(
        allowed_roots=(tmp_path.resolve(),),
        policy=PolicySettings(default=DEFAULT),
        catalogue=(entry,),
    )
    m = ModelManager(backend, settings)
    yield m
    await m.close(1.0)
    backend.close()


def ckpt(tmp_path: Path, name: str) -> Path:
    return make_checkpoint(tmp_path / name, layers=2, hidden=32)


def test_the_config_checks_model_ids_as_the_core_does() -> None:
    assert MODEL_ID_PATTERN.pattern == MODEL_ID.pattern


async def test_a_model_without_entry_or_request_policy_gets_the_defaults(
    manager: ModelManager, tmp_path: Path
) -> None:
    model = await manager.load("plain", str(ckpt(tmp_path, "plain")))
    assert model.policy == DEFAULT
    assert model.registered is False


async def test_the_request_wins_over_the_entry_which_wins_over_the_defaults(
    manager: ModelManager, tmp_path: Path
) -> None:
    source = ckpt(tmp_path, "listed")
    # The entry (from settings.catalogue) sets priority and pinned; its other
    # fields are whatever it was built with. The request sets priority only.
    model = await manager.load("listed", str(source), policy=PolicyOverrides(priority=-3))
    assert model.policy == ModelPolicy(priority=-3, pinned=True)
    assert model.registered is True
    # Registered through the manager: the entry is its fields over the defaults.
    await manager.register("reg", str(ckpt(tmp_path, "reg")), policy=PolicyOverrides(idle_level=1))
    model = await manager.load("reg", "", policy=PolicyOverrides(pinned=True))
    assert model.policy == ModelPolicy(idle_timeout=600.0, idle_level=1, priority=1, pinned=True)
    assert model.checkpoint.path == str((tmp_path / "reg").resolve())  # the entry's source


async def test_a_registered_model_not_loaded_is_unloaded_and_listed_only_when_asked(
    manager: ModelManager, tmp_path: Path
) -> None:
    got = manager.get("listed")
    assert (got.state, got.registered, got.layers) == (ModelState.UNLOADED, True, ())
    assert got.policy == ModelPolicy(priority=7, pinned=True)
    assert manager.known("listed") and not manager.known("nobody")
    assert manager.list_models() == []
    await manager.load("plain", str(ckpt(tmp_path, "plain")))
    listed = manager.list_models(registered=True)
    assert [(m.model_id, m.state, m.registered) for m in listed] == [
        ("listed", ModelState.UNLOADED, True),
        ("plain", ModelState.ACTIVE, False),
    ]
    assert [m.model_id for m in manager.list_models()] == ["plain"]


async def test_register_replaces_an_entry_and_gives_a_loaded_model_its_policy(
    manager: ModelManager, tmp_path: Path
) -> None:
    source = str(ckpt(tmp_path, "m"))
    await manager.load("m", source, policy=PolicyOverrides(priority=9))
    events = manager.bus.subscribe("m")
    snap = await manager.register("m", source, policy=PolicyOverrides(pinned=True))
    assert snap.state is ModelState.ACTIVE and snap.registered
    assert snap.policy == ModelPolicy(idle_timeout=600.0, idle_level=2, priority=1, pinned=True)
    # Replaced: the new entry's unset fields are the defaults, not the old entry's.
    snap = await manager.register("m", source, device=manager.backend.devices()[1].uuid)
    assert snap.policy == DEFAULT
    entry = manager.catalogue.get("m")
    assert entry is not None and entry.device == manager.backend.devices()[1].uuid
    event = await anext(aiter(events))
    assert event.type is EventType.CHANGED and event.model.registered
    events.close()


async def test_deregister_keeps_a_loaded_model_and_refuses_an_unknown_id(
    manager: ModelManager, tmp_path: Path
) -> None:
    await manager.load("listed", str(ckpt(tmp_path, "listed")))
    manager.deregister("listed")
    got = manager.get("listed")
    assert got.state is ModelState.ACTIVE and not got.registered
    assert got.policy == ModelPolicy(priority=7, pinned=True)  # (what it was loaded with)
    with pytest.raises(NotFound) as info:
        manager.deregister("listed")
    assert info.value.reason == "MODEL_NOT_REGISTERED"
    with pytest.raises(InvalidArgument) as bad:
        manager.deregister("../etc")
    assert bad.value.reason == "INVALID_MODEL_ID"


async def test_set_policy_changes_the_fields_it_sets_on_the_model_and_its_entry(
    manager: ModelManager, tmp_path: Path
) -> None:
    await manager.load("listed", str(ckpt(tmp_path, "listed")), policy=PolicyOverrides(priority=2))
    snap = manager.set_policy("listed", PolicyOverrides(idle_timeout=30.0, pinned=False))
    assert snap.policy == ModelPolicy(idle_timeout=30.0, priority=2, pinned=False)
    entry = manager.catalogue.get("listed")
    assert entry is not None
    assert entry.policy == ModelPolicy(idle_timeout=30.0, priority=7, pinned=False)
    with pytest.raises(NotFound) as info:
        manager.set_policy("nobody", PolicyOverrides(pinned=True))
    assert info.value.reason == "MODEL_NOT_FOUND"


async def test_set_policy_of_a_model_in_a_transition_is_just_data(
    manager: ModelManager, tmp_path: Path
) -> None:
    source = str(make_checkpoint(tmp_path / "big", layers=8, hidden=256))
    snap = await manager.load("big", source, wait=False)
    assert snap.state is ModelState.LOADING
    changed = manager.set_policy("big", PolicyOverrides(pinned=True))
    assert changed.policy.pinned
    model = manager.find("big")
    assert model is not None and model.task is not None
    done = await model.task
    assert done.state is ModelState.ACTIVE and done.policy.pinned


async def test_a_refused_policy_changes_nothing(manager: ModelManager, tmp_path: Path) -> None:
    source = str(ckpt(tmp_path, "m"))
    with pytest.raises(InvalidArgument) as info:
        await manager.load("m", source, policy=PolicyOverrides(idle_level=3))
    assert (info.value.reason, info.value.metadata["field"]) == (
        "INVALID_POLICY",
        "policy.idle_level",
    )
    assert manager.list_models() == [] and not manager.known("m")
    with pytest.raises(FailedPrecondition) as nodisk:
        await manager.register("m", source, policy=PolicyOverrides(evict_to=Tier.DISK))
    assert nodisk.value.reason == "DISK_CACHE_DISABLED"
    with pytest.raises(TorporError) as outside:
        await manager.register("m", "/etc/passwd")
    assert outside.value.reason == "SOURCE_NOT_ALLOWED"
    with pytest.raises(InvalidArgument) as device:
        await manager.register("m", source, device="GPU-nope")
    assert device.value.reason == "UNKNOWN_DEVICE"
    assert manager.catalogue.get("m") is None


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (PolicyOverrides(idle_timeout=-1.0), "policy.idle_timeout"),
        (PolicyOverrides(idle_timeout=float("nan")), "policy.idle_timeout"),
        (PolicyOverrides(idle_timeout=31 * 86400.0), "policy.idle_timeout"),
        (PolicyOverrides(idle_level=0), "policy.idle_level"),
        (PolicyOverrides(priority=1001), "policy.priority"),
        (PolicyOverrides(priority=-1001), "policy.priority"),
        (PolicyOverrides(evict_to=Tier.DEVICE), "policy.evict_to"),
        (PolicyOverrides(windows=(Window(0, 3600),) * 65), "policy.windows"),
        (PolicyOverrides(windows=(Window(-1, 3600),)), "policy.windows[0].start"),
        (PolicyOverrides(windows=(Window(0, 604800),)), "policy.windows[0].end"),
        (PolicyOverrides(windows=(Window(0, 0),)), "policy.windows[0].end"),
        (PolicyOverrides(windows=(Window(0, 60, Tier.DISK),)), "policy.windows[0].tier"),
        (PolicyOverrides(windows=(Window(0, 60, lead=86401),)), "policy.windows[0].lead"),
        (
            PolicyOverrides(windows=(Window(0, 60), Window(float("inf"), 60))),
            "policy.windows[1].start",
        ),
    ],
)
def test_each_policy_field_out_of_range_is_named(policy: PolicyOverrides, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_policy(policy, disk=True)
    assert info.value.reason == "INVALID_POLICY"
    assert info.value.metadata["field"] == field
    assert field in info.value.message


def test_a_week_wrapping_window_and_the_bounds_themselves_are_accepted() -> None:
    check_policy(
        PolicyOverrides(
            idle_timeout=30 * 86400.0,
            priority=-1000,
            windows=(Window(597600, 7200, Tier.DEVICE, 86400),) * 64,
        ),
        disk=False,
    )


def test_the_catalogue_is_bounded_but_replacing_an_entry_is_not_adding_one() -> None:
    catalogue = Catalogue(limit=2)
    for name in ("a", "b", "b"):
        catalogue.put(Entry(name, "/x", "", ModelPolicy()))
    with pytest.raises(ResourceExhausted) as info:
        catalogue.put(Entry("c", "/x", "", ModelPolicy()))
    assert info.value.reason == "CATALOGUE_FULL"
    assert [e.model_id for e in catalogue.entries()] == ["a", "b"]
