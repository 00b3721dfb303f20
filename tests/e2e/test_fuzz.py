"""The daemon under hostile input, bounded and seeded: mutated checkpoints,
random and malformed RPCs, and storms of concurrent clients.

Each asserts what the issue that found the daemon's weak spots asks: only
documented status codes come back, each with its ErrorInfo reason (never
UNKNOWN or INTERNAL); error text never carries what a refused file held; the
daemon answers a health check throughout; and afterwards every pool and the
daemon's fd count are back where they started.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torpor import Client
from torpor.errors import TorporError, from_rpc_error
from torpor.testing import make_checkpoint, write_safetensors
from torpor.v1 import agent_pb2, common_pb2, models_pb2, node_pb2

from .conftest import Daemon
from .observe import fd_targets, open_fds, settle, used

SECRET = "s3cr3t-Tok3n"
# What a refusal may be; UNKNOWN, INTERNAL, UNIMPLEMENTED and the like never.
DOCUMENTED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
}


def warm_up(client: Client, source: str) -> None:
    """Once through every verb: what the daemon sets up on first use (its
    event loop's io_uring, gRPC's threads) is not a leak."""
    client.load_model("warm-up", source)
    client.offload_model("warm-up", ["layers.0"])
    client.sleep_model("warm-up", 2)
    client.wake_model("warm-up")
    client.sleep_model("warm-up")
    client.wake_model("warm-up")
    client.unload_model("warm-up")


def unload_everything(client: Client) -> None:
    for model in client.list_models():
        try:
            client.unload_model(model.model_id, force=True)
        except TorporError as err:  # (an Unload sent without waiting got there first)
            assert err.reason == "MODEL_NOT_FOUND", err


def check_refusal(err: TorporError, what: object) -> None:
    assert err.code in DOCUMENTED, (what, err)
    assert err.domain == "torpor.dev" and err.reason, (what, err)  # an ErrorInfo
    text = err.message + json.dumps(err.metadata)
    assert SECRET not in text, (what, err)
    assert len(text) < 8192, (what, len(text))


class Heartbeat:
    """Health checks on a thread throughout: each must be answered (a generous
    deadline: this detects a daemon that stopped answering, not a slow one)."""

    def __init__(self, socket: Path) -> None:
        self._channel = grpc.insecure_channel(f"unix:{socket}")
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        self._stop = threading.Event()
        self.answered = 0
        self.failures: list[str] = []
        # Connected before the test counts the daemon's fds.
        self._stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self._stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
                self.answered += 1
            except grpc.RpcError as err:
                self.failures.append(f"{err.code()}: {err.details()}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._channel.close()


@pytest.fixture
def heartbeat(daemon: Daemon) -> Iterator[Heartbeat]:
    beat = Heartbeat(daemon.socket)
    yield beat
    beat.close()
    assert not beat.failures, beat.failures[:5]
    assert beat.answered > 0


# -- mutated checkpoints --------------------------------------------------------


def base_checkpoint(path: Path) -> bytes:
    """A small valid checkpoint whose tensor names and metadata hold SECRET."""
    rng = random.Random(1)
    tensors = {
        f"model.layers.{i}.{SECRET}.weight": ("F16", [4, 8], rng.randbytes(64)) for i in range(3)
    }
    tensors["model.embed_tokens.weight"] = ("F32", [2, 4], rng.randbytes(32))
    tensors["lm_head.weight"] = ("BF16", [3], rng.randbytes(6))
    write_safetensors(path, tensors, metadata={"note": SECRET})
    return path.read_bytes()


def header_of(raw: bytes) -> tuple[dict[str, object], bytes]:
    (n,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def with_header(text: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(text) if length is None else length) + text + data


WEIRD_VALUES: list[object] = [
    None, True, -1, 0, 2**64, 2**70, 1.5, "F16", "", "\ud800", [], [1, -1], [2**64],
    [[1]], {}, {"a": 1}, "x" * 1000, [0, 0], [0, 2**63], ["0", "8"],
]  # fmt: skip


def mutate(raw: bytes, rng: random.Random) -> bytes:
    header, data = header_of(raw)
    names = [k for k in header if k != "__metadata__"]
    kind = rng.randrange(14)
    if kind == 0:  # a field of an entry gets a weird value
        entry = header[rng.choice(names)]
        assert isinstance(entry, dict)
        entry[rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(WEIRD_VALUES)
    elif kind == 1:  # an entry loses or gains a key
        entry = header[rng.choice(names)]
        assert isinstance(entry, dict)
        if rng.random() < 0.5:
            entry.pop(rng.choice(list(entry)), None)
        else:
            entry[SECRET] = rng.choice(WEIRD_VALUES)
    elif kind == 2:  # a weird tensor name (a lone surrogate, empty, huge)
        name = rng.choice(names)
        header[rng.choice(["\ud800" + SECRET, "", SECRET * 500, f"{SECRET}\udfff"])] = header.pop(
            name
        )
    elif kind == 3:  # weird metadata
        header["__metadata__"] = rng.choice(
            [{SECRET: 1}, {"k": "\ud800" + SECRET}, [SECRET], SECRET, {"k": {"x": SECRET}}]
        )
    elif kind == 4:  # the header length field
        text = json.dumps(header).encode()
        length = rng.choice([0, 1, len(text) - 1, len(text) + 1, 2**63, rng.randrange(2**64)])
        return with_header(text, data, length)
    elif kind == 5:  # truncated anywhere
        return raw[: rng.randrange(len(raw))]
    elif kind == 6:  # random bytes flipped in the header
        out = bytearray(raw)
        (n,) = struct.unpack_from("<Q", raw)
        for _ in range(rng.randint(1, 4)):
            out[8 + rng.randrange(n)] = rng.randrange(256)
        return bytes(out)
    elif kind == 7:  # deep nesting in a value
        depth = rng.choice([100, 1000, 5000])
        text = json.dumps(header).encode()
        nest = b"[" * depth + json.dumps(SECRET).encode() + b"]" * depth
        text = text.replace(b'"__metadata__"', b'"' + SECRET.encode() + b'":' + nest + b',"m"', 1)
        return with_header(text, data)
    elif kind == 8:  # NaN / Infinity / -0 / duplicate keys, in the text
        text = json.dumps(header).encode()
        swap = rng.choice(
            [
                (b"[0,", b"[-0,"),
                (b"[4, 8]", b"[NaN, 8]"),
                (b"[3]", b"[Infinity]"),
                (b"{", b'{"x":1,"x":2,'),
            ]
        )
        return with_header(text.replace(swap[0].replace(b",", b", "), swap[1], 1), data)
    elif kind == 9:  # not an object at the top
        text = json.dumps(rng.choice([[SECRET], SECRET, 1, None])).encode()
        return with_header(text, data)
    elif kind == 10:  # a text file, named .safetensors
        return (f"{SECRET} is not a checkpoint\n" * 40).encode()
    elif kind == 11:  # the data area grows or shrinks
        return raw + rng.randbytes(rng.randint(1, 64)) if rng.random() < 0.5 else raw[:-1]
    elif kind == 12:  # offsets shifted (overlap, hole)
        entry = header[rng.choice(names)]
        assert isinstance(entry, dict)
        begin, end = entry["data_offsets"]  # type: ignore[misc]
        shift = rng.choice([-2, -1, 1, 2])
        entry["data_offsets"] = [max(0, begin + shift), max(0, end + shift)]
    else:  # many tensors (zero-size), within the header limit
        for i in range(rng.choice([1000, 20000])):
            header[f"{SECRET}.{i}"] = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
    return with_header(json.dumps(header).encode(), data)


def test_mutated_checkpoints_get_documented_codes_and_leak_nothing(
    daemon: Daemon, heartbeat: Heartbeat
) -> None:
    rng = random.Random(11)
    raw = base_checkpoint(daemon.models / "base.safetensors")
    path = daemon.models / "m.safetensors"
    with Client(socket=str(daemon.socket), timeout=60) as client:
        client.load_model("base", str(daemon.models / "base.safetensors"))
        client.unload_model("base")
        baseline = open_fds(daemon.proc.pid)
        before = fd_targets(daemon.proc.pid)
        refused = loaded = 0
        tries = int(os.environ.get("FUZZ_N", 2000))
        for i in range(tries):
            path.write_bytes(mutate(raw, rng))
            try:
                client.load_model(f"m{i}", str(path))
            except TorporError as err:
                check_refusal(err, i)
                refused += 1
                continue
            loaded += 1  # (a mutation that left it valid)
            client.unload_model(f"m{i}")
        assert refused > 0.75 * tries
        assert not client.list_models()
        assert used(client) == (0, 0)
        assert settle(lambda: open_fds(daemon.proc.pid) == baseline), set(
            fd_targets(daemon.proc.pid)
        ) ^ set(before)


# -- random and malformed RPCs ---------------------------------------------------

STRINGS = [
    "", "m", "demo", "../../etc", "/etc/shadow", "/proc/self/environ", "x" * 5000,
    "\x00", "é" * 300, "layers.0", "pre", "post", "models/demo", "a" * 129,
    "/dev/zero", "/tmp", "HOST-0", "GPU-deadbeef",
]  # fmt: skip
INTS = [0, 1, 2, 3, -1, 7, 2**31 - 1, -(2**31), 99]

UNARY: dict[str, tuple[str, type]] = {
    "LoadModel": ("torpor.v1.ModelService", models_pb2.LoadModelRequest),
    "SleepModel": ("torpor.v1.ModelService", models_pb2.SleepModelRequest),
    "WakeModel": ("torpor.v1.ModelService", models_pb2.WakeModelRequest),
    "OffloadModel": ("torpor.v1.ModelService", models_pb2.OffloadModelRequest),
    "UnloadModel": ("torpor.v1.ModelService", models_pb2.UnloadModelRequest),
    "GetModel": ("torpor.v1.ModelService", models_pb2.GetModelRequest),
    "ListModels": ("torpor.v1.ModelService", models_pb2.ListModelsRequest),
    "GetNode": ("torpor.v1.NodeService", node_pb2.GetNodeRequest),
}


def random_message(cls: type, rng: random.Random, models: list[str], source: str) -> bytes:
    msg = cls()
    for field in msg.DESCRIPTOR.fields:
        if rng.random() < 0.4:
            continue
        pool: list[object]
        if field.type == field.TYPE_STRING:
            pool = [*STRINGS, *models, source]
            if field.name == "request_id" and rng.random() < 0.1:
                pool = ["r" * 200_000]
        elif field.type == field.TYPE_BOOL:
            pool = [True, False]
        elif field.type == field.TYPE_ENUM or field.type in (
            field.TYPE_INT32,
            field.TYPE_INT64,
            field.TYPE_UINT32,
        ):
            pool = INTS
        else:
            continue
        if field.is_repeated:
            count = rng.choice([1, 3, 50, 20_000])
            if count > 50:  # (many, but short: a message stays under gRPC's 4 MiB)
                pool = [v for v in pool if len(str(v)) < 20]
            getattr(msg, field.name).extend(rng.choice(pool) for _ in range(count))
        else:
            value = rng.choice(pool)
            if field.type == field.TYPE_STRING:
                value = str(value)
            with contextlib.suppress(ValueError, TypeError):  # (a value the field can't hold)
                setattr(msg, field.name, value)
    return msg.SerializeToString()  # type: ignore[no-any-return]


def test_random_and_malformed_rpcs_get_documented_codes(
    daemon: Daemon, heartbeat: Heartbeat
) -> None:
    rng = random.Random(12)
    (daemon.models / "d").mkdir()
    base_checkpoint(daemon.models / "d" / "model.safetensors")
    source = str(daemon.models / "d")
    models = ["demo", "other"]
    channel = grpc.insecure_channel(f"unix:{daemon.socket}")
    with Client(socket=str(daemon.socket), timeout=60) as client:
        warm_up(client, source)
        baseline = open_fds(daemon.proc.pid)
        codes: dict[str, int] = {}
        for i in range(1500):
            method = rng.choice(sorted(UNARY))
            service, cls = UNARY[method]
            if rng.random() < 0.25:  # bytes that don't decode as the request
                body = rng.choice(
                    [rng.randbytes(rng.randint(1, 64)), b"\xff" * 9, b"\x0a\xff\xff\xff\xff\x0f"]
                )
            else:
                body = random_message(cls, rng, models, source)
            call = channel.unary_unary(f"/{service}/{method}")
            try:
                call(body, timeout=60)
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as rpc:
                err = from_rpc_error(rpc)
                check_refusal(err, (i, method))
                codes[err.code.name] = codes.get(err.code.name, 0) + 1
        # Attach streams that start with junk or a random Hello.
        attach = channel.stream_stream("/torpor.v1.AgentService/Attach")
        for i in range(100):
            if rng.random() < 0.5:
                first = rng.randbytes(rng.randint(1, 32))
            else:
                first = agent_pb2.AttachRequest(
                    hello=agent_pb2.Hello(
                        model_id=rng.choice([*models, *STRINGS]), pid=rng.choice(INTS)
                    )
                ).SerializeToString()
            try:
                for _ in attach(iter([first]), timeout=60):
                    break
            except grpc.RpcError as rpc:
                err = from_rpc_error(rpc)
                if err.code is not grpc.StatusCode.CANCELLED:  # (we hung up first)
                    check_refusal(err, ("Attach", i))
        unload_everything(client)
        assert used(client) == (0, 0)
        assert settle(lambda: open_fds(daemon.proc.pid) == baseline), (
            f"{baseline}: {' '.join(fd_targets(daemon.proc.pid))}"
        )
        assert codes.get("INVALID_ARGUMENT", 0) > 100, codes
    channel.close()


# -- storms -------------------------------------------------------------------------


def test_a_storm_of_clients_ends_with_everything_unloadable(
    daemon: Daemon, heartbeat: Heartbeat
) -> None:
    """16 clients, random verbs (forced unloads included) on 3 models, each
    waiting or not; then unloading everything brings every pool and the fd
    count back to their baseline."""
    for name in ("a", "b", "c"):  # big enough that transitions overlap (~4 MiB)
        make_checkpoint(daemon.models / name, layers=4, hidden=256, shards=2)
    with Client(socket=str(daemon.socket), timeout=60) as client:
        warm_up(client, str(daemon.models / "a"))
        baseline = open_fds(daemon.proc.pid)

    failures: list[str] = []

    def act(c: Client, rng: random.Random) -> None:
        model = rng.choice("abc")
        wait = rng.random() < 0.5
        verb = rng.randrange(8)
        if verb == 0:
            c.load_model(model, str(daemon.models / model), wait=wait)
        elif verb == 1:
            c.sleep_model(model, level=rng.choice([1, 2]), wait=wait)
        elif verb == 2:
            c.wake_model(model, wait=wait)
        elif verb == 3:
            c.offload_model(model, ["layers.0"], tier=common_pb2.TIER_HOST, wait=wait)
        elif verb in (4, 5):
            c.unload_model(model, force=verb == 5, wait=wait)
        elif verb == 6:
            c.get_model(model, models_pb2.MODEL_VIEW_FULL)
        else:
            c.list_models()

    def storm(seed: int) -> None:
        rng = random.Random(seed)
        with Client(socket=str(daemon.socket), timeout=60) as c:
            for _ in range(100):
                try:
                    act(c, rng)
                except TorporError as err:
                    if err.code not in DOCUMENTED or not err.reason:
                        failures.append(repr(err))

    threads = [threading.Thread(target=storm, args=(seed,)) for seed in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    with Client(socket=str(daemon.socket), timeout=60) as client:
        unload_everything(client)
        assert not client.list_models()
        assert used(client) == (0, 0)
        assert settle(lambda: open_fds(daemon.proc.pid) == baseline), (
            f"{baseline}: {' '.join(fd_targets(daemon.proc.pid))}"
        )
