"""Publishing against a real torpord, from a raw engine that breaks the
protocol on purpose: every misstep is refused with its reason, and what is
refused changes nothing and holds nothing."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torpor import Client
from torpor.errors import TorporError
from torpor.testing import make_checkpoint
from torpor.v1 import agent_pb2, common_pb2

from .conftest import Daemon
from .observe import settle, used
from .rawpublish import Stream, catalogue, publisher, write_all

MiB = 1 << 20
FP = "raw-engine/v1"
GROUPS = [("pre", 4096), ("layers.0", 3 * 4096 + 17), ("post", 100)]


def state(client: Client, model_id: str) -> int:
    return client.get_model(model_id).state


def gone(client: Client, model_id: str) -> bool:
    return all(m.model_id != model_id for m in client.list_models())


def test_a_commit_from_a_plain_attachment_is_refused(daemon: Daemon, client: Client) -> None:
    ckpt = make_checkpoint(daemon.models / "m", layers=2)
    client.load_model("m", str(ckpt))
    before = client.get_model("m")
    engine = Stream(client, agent_pb2.Hello(model_id="m", pid=os.getpid()))
    try:
        engine.commit()
        err = engine.end_error()
        assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_PUBLISHING")
    finally:
        engine.close()
    after = client.get_model("m")
    assert after.state == common_pb2.MODEL_STATE_ACTIVE
    assert [(la.name, la.checksum, la.tier) for la in after.layers] == [
        (la.name, la.checksum, la.tier) for la in before.layers
    ]
    assert after.last_transition == before.last_transition
    assert settle(lambda: client.get_model("m").engines == 0)


def test_commit_twice(daemon: Daemon, client: Client) -> None:
    pub = publisher(client, "img", catalogue(FP, GROUPS))
    try:
        wrote = write_all(pub, 9)
        pub.commit()
        pub.commit()
        # The second is a protocol error: the stream ends with it (after
        # Published, or before it if the daemon read both first).
        err = pub.end_error()
        assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_PUBLISHING")
    finally:
        pub.close()
    # The first commit stands: sealed, checksummed, ACTIVE.
    assert settle(lambda: state(client, "img") == common_pb2.MODEL_STATE_ACTIVE)
    model = client.get_model("img")
    assert [la.size_bytes for la in model.layers] == [len(b) for b in wrote.values()]
    assert all(la.checksum for la in model.layers)
    client.sleep_model("img", level=1)
    client.wake_model("img", verify=True)  # (the bytes are the ones written)


def test_a_commit_while_still_mapped_writable_fails_and_frees(
    daemon: Daemon, client: Client
) -> None:
    before = used(client)
    pub = publisher(client, "img", catalogue(FP, GROUPS))
    header, fds = pub.fds(["layers.0"])
    mm = mmap.mmap(fds[0], header["layers"][0]["size"], mmap.MAP_SHARED, mmap.PROT_WRITE)
    try:
        mm[:4] = b"busy"
        pub.commit()
        err = pub.end_error()
        assert (err.code, err.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "STILL_MAPPED_WRITABLE",
        )
        assert err.metadata["layer"] == "layers.0"
        assert settle(lambda: gone(client, "img"))
        assert settle(lambda: used(client) == before)
        # The id and the fingerprint are free again.
        again = publisher(client, "img", catalogue(FP, GROUPS))
        again.close()
    finally:
        mm.close()  # (not touched again: the daemon truncated it)
        for fd in fds:
            os.close(fd)
        pub.close()
    assert settle(lambda: gone(client, "img") and used(client) == before)


def test_after_the_commit_the_publisher_gets_read_only_fds_and_cannot_resize(
    daemon: Daemon, client: Client
) -> None:
    pub = publisher(client, "img", catalogue(FP, GROUPS))
    try:
        write_all(pub, 5)
        _, kept = pub.fds(["post"])  # a writable fd it keeps (not mapped)
        pub.commit()
        assert pub.next().HasField("published")
        header, fds = pub.fds()
        try:
            assert header["writable"] is False
            with pytest.raises(PermissionError):
                mmap.mmap(fds[0], 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            for fd in fds:
                os.close(fd)
        # Its old writable fd can neither write nor shrink the sealed slab
        # (a shrunk slab would kill the daemon with SIGBUS on its next read).
        with pytest.raises(PermissionError):
            os.pwrite(kept[0], b"x", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(kept[0], 0)
        os.close(kept[0])
        client.sleep_model("img", level=1)  # (reads every slab)
        client.wake_model("img", verify=True)
        assert daemon.proc.poll() is None
    finally:
        pub.close()


def test_nobody_else_takes_a_publishers_fds(daemon: Daemon, client: Client) -> None:
    pub = publisher(client, "img", catalogue(FP, GROUPS))
    try:
        script = textwrap.dedent(
            """
            import sys
            from torpor.agent import request_fds
            from torpor.errors import TorporError
            try:
                request_fds(sys.argv[1], sys.argv[2], [], timeout=60)
            except TorporError as err:
                print(err.reason)
            else:
                print("GOT FDS")
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", script, pub.attached.fd_socket, pub.attached.attachment_id],
            capture_output=True,
            text=True,
            timeout=120,
            env=daemon.env,
        )
        assert out.stdout.strip() == "PID_MISMATCH", out.stderr
        # Nor can another engine attach to it while it is written.
        with pytest.raises(TorporError) as err:
            Stream(client, agent_pb2.Hello(model_id="img", pid=os.getpid()))
        assert err.value.reason == "MODEL_NOT_ACTIVE"
        # The publisher goes on unharmed.
        assert state(client, "img") == common_pb2.MODEL_STATE_PUBLISHING
        write_all(pub)
        pub.commit()
        assert pub.next().HasField("published")
    finally:
        pub.close()


def test_publishing_over_a_loaded_models_id_is_refused(daemon: Daemon, client: Client) -> None:
    ckpt = make_checkpoint(daemon.models / "m", layers=1)
    client.load_model("m", str(ckpt))
    before, model = used(client), client.get_model("m")
    with pytest.raises(TorporError) as err:
        publisher(client, "m", catalogue(FP, GROUPS))
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.ALREADY_EXISTS, "MODEL_EXISTS")
    assert used(client) == before
    assert client.get_model("m") == model
    assert [m.model_id for m in client.list_models()] == ["m"]


@pytest.mark.parametrize(
    "groups",
    [
        [("pre", 200 * MiB), ("post", 200 * MiB)],  # each fits; both don't
        [("pre", 1 << 40)],  # a valid catalogue, far over any budget
    ],
)
def test_over_budget_takes_nothing(
    daemon: Daemon, client: Client, groups: list[tuple[str, int]]
) -> None:
    before = used(client)
    pub = catalogue(FP, [(name, 4096) for name, _ in groups])
    for group, (_, size) in zip(pub.groups, groups, strict=True):
        group.size_bytes = size
    with pytest.raises(TorporError) as err:
        publisher(client, "img", pub)
    assert (err.value.code, err.value.reason) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "OUT_OF_MEMORY",
    )
    assert used(client) == before and client.list_models() == []


def refusal(client: Client, publish: agent_pb2.Publish) -> TorporError:
    with pytest.raises(TorporError) as err:
        publisher(client, "img", publish)
    assert client.list_models() == []
    return err.value


def test_a_catalogue_at_and_past_the_field_limits(daemon: Daemon, client: Client) -> None:
    health = health_pb2_grpc.HealthStub(client.channel)
    too_many_groups = catalogue(FP, [(f"g{i}", 1) for i in range(4097)])
    err = refusal(client, too_many_groups)
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_ITEMS")
    assert err.metadata["field"] == "hello.publish.groups"
    err = refusal(client, catalogue(FP, [("pre", 1)], tensors=65537))
    assert (err.reason, err.metadata["field"]) == (
        "TOO_MANY_ITEMS",
        "hello.publish.groups[0].tensors",
    )
    err = refusal(client, catalogue("f" * 1025, [("pre", 1)]))
    assert (err.reason, err.metadata["field"]) == ("FIELD_TOO_LONG", "hello.publish.fingerprint")
    err = refusal(client, catalogue("bad\x1bfingerprint", [("pre", 1)]))
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FINGERPRINT")
    err = refusal(client, catalogue(FP, [("pre", 1), ("post", 1), ("pre", 1)]))
    assert err.reason == "INVALID_CATALOGUE" and "group 2 ('pre')" in err.message

    # At the limits: accepted, while Health keeps answering.
    answers: list[int] = []

    def ask_health() -> None:
        for _ in range(5):
            answers.append(health.Check(health_pb2.HealthCheckRequest(), timeout=60).status)

    asker = threading.Thread(target=ask_health)
    asker.start()
    big = publisher(client, "big", catalogue("f" * 1024, [("pre", 1)], tensors=65536))
    asker.join(120)
    assert answers == [health_pb2.HealthCheckResponse.SERVING] * 5
    try:
        assert state(client, "big") == common_pb2.MODEL_STATE_PUBLISHING
    finally:
        big.close()
    assert settle(lambda: client.list_models() == [])
    wide = publisher(client, "wide", catalogue(FP, [(f"g{i}", 1) for i in range(4096)]))
    try:
        assert len(client.get_model("wide").layers) == 4096
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=60).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
    finally:
        wide.close()
    assert settle(lambda: client.list_models() == [] and used(client) == (0, 0))


def test_sigterm_while_publishing_exits_cleanly(daemon: Daemon, client: Client) -> None:
    pub = publisher(client, "img", catalogue(FP, GROUPS))
    try:
        write_all(pub)
        assert state(client, "img") == common_pb2.MODEL_STATE_PUBLISHING
        assert daemon.stop() == 0
        # (This raw engine never answers Quiesce: revoked, or cut off.)
        assert pub.end_error().code in (
            grpc.StatusCode.ABORTED,
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.CANCELLED,
        )
    finally:
        pub.close()
    log = daemon.log()
    assert "Traceback" not in log and '"level": "error"' not in log, log
    assert "STOPPING=1" in daemon.notifications
