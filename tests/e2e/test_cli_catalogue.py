"""torporctl register / list --registered / get / load / policy / deregister /
acquire against a real torpord."""

from __future__ import annotations

import json

from torpor.testing import make_checkpoint

from .conftest import Daemon


def test_the_catalogue_and_policy_commands_end_to_end(daemon: Daemon) -> None:
    source = make_checkpoint(daemon.models / "demo", layers=2, hidden=32)
    out = daemon.ctl(
        "register", "demo", str(source), "--idle-timeout", "5m", "--idle-level", "2",
        "--priority", "4", "--window", "Mon-Fri 08:00-18:00",
        "--window", "Sun 22:00-02:00 device lead 10m",
    ).stdout  # fmt: skip
    assert "State:       unloaded" in out
    assert "Policy:      sleeps (level 2) after 5m00s idle, priority 4, evicted to host" in out
    assert (
        "Windows:     Mon,Tue,Wed,Thu,Fri 08:00-18:00 host lead 5m;"
        " Sun 22:00-02:00 device lead 10m (UTC)"
    ) in out
    assert "Registered:  yes" in out
    assert daemon.ctl("list").stdout.strip() == "No models."
    listed = daemon.ctl("list", "--registered").stdout
    assert "demo" in listed and "unloaded" in listed
    # A Load without a source: the registered one; its flags win over the entry.
    out = daemon.ctl("load", "demo", "--priority", "9", "--pin").stdout
    assert "State:       active" in out and "priority 9, pinned" in out
    out = daemon.ctl("policy", "demo", "--unpin", "--evict-to", "source").stdout
    assert "priority 9, evicted to source" in out
    shown = json.loads(daemon.ctl("--json", "policy", "demo").stdout)["model"]
    assert shown["policy"]["idle_level"] == 2 and shown["registered"] is True
    assert len(shown["policy"]["windows"]) == 6
    out = daemon.ctl("policy", "demo", "--clear-windows").stdout
    assert "Windows:" not in out and "priority 9, evicted to source" in out
    shown = json.loads(daemon.ctl("--json", "policy", "demo").stdout)["model"]
    assert "windows" not in shown["policy"]
    both = daemon.ctl(
        "policy", "demo", "--clear-windows", "--window", "daily 01:00-02:00", check=False
    )
    assert both.returncode == 1 and "INVALID_POLICY" in both.stderr
    assert daemon.ctl("deregister", "demo").stdout == "Deregistered model 'demo'\n"
    got = daemon.ctl("get", "demo").stdout
    assert "Registered" not in got and "evicted to source" in got
    failed = daemon.ctl("deregister", "demo", check=False)
    assert failed.returncode == 1
    assert "(NOT_FOUND MODEL_NOT_REGISTERED)" in failed.stderr


def test_a_bad_policy_or_a_missing_model_is_reported_cleanly(daemon: Daemon) -> None:
    failed = daemon.ctl(
        "register", "x", str(daemon.models / "x"), "--priority", "5000", check=False
    )
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "policy.priority: expected -1000 to 1000, got 5000" in failed.stderr
    assert "(INVALID_ARGUMENT INVALID_POLICY)" in failed.stderr
    assert "field: policy.priority" in failed.stderr
    failed = daemon.ctl("policy", "ghost", "--pin", check=False)
    assert failed.returncode == 1 and "(NOT_FOUND MODEL_NOT_FOUND)" in failed.stderr


def test_acquire_reports_what_torpord_answers(daemon: Daemon) -> None:
    source = make_checkpoint(daemon.models / "demo", layers=2, hidden=32)
    daemon.ctl("load", "demo", str(source))
    done = daemon.ctl("acquire", "demo", check=False)
    assert "Traceback" not in done.stderr
    if done.returncode == 0:  # (AcquireModel built: the model is active, a hit)
        assert done.stdout == "hit: 'demo' was active, ready at once\n"
    else:  # (not yet: UNIMPLEMENTED, said plainly)
        assert done.returncode == 1
        assert "(UNIMPLEMENTED)" in done.stderr and "does not offer that call" in done.stderr
