"""Control plane: GetModel and ListModels latency under 32 concurrent clients, and
the cost of a Sleep/Wake round trip of a tiny model, on a real torpord.

    python -m tests.bench.bench_control [--runs N]

Baseline, measured in the same run: grpc.health.v1.Health/Check, the cheapest
call the same server answers. Clients are 4 processes of 8 threads each.
"""

from __future__ import annotations

import multiprocessing
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torpor import Client
from torpor.testing import make_checkpoint
from torpor.v1 import models_pb2, models_pb2_grpc

from tests.bench.common import machine, parser
from tests.e2e.conftest import Daemon

PROCESSES, THREADS = 4, 8
CALLS = 200  # per client


def _client_process(socket: str, method: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    channel = grpc.insecure_channel(f"unix:{socket}")
    models = models_pb2_grpc.ModelServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    call = {
        "GetModel": lambda: models.GetModel(models_pb2.GetModelRequest(model_id="tiny-0")),
        "ListModels": lambda: models.ListModels(models_pb2.ListModelsRequest()),
        "Health/Check": lambda: health.Check(health_pb2.HealthCheckRequest()),
    }[method]
    call()  # connect first
    latencies: list[float] = []
    lock = threading.Lock()

    def client() -> None:
        mine = []
        for _ in range(CALLS):
            start = time.perf_counter()
            call()
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    channel.close()
    out.put(latencies)


def measure(socket: str, method: str) -> tuple[float, float]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_client_process, args=(socket, method, out)) for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    latencies = [x for _ in procs for x in out.get()]
    for p in procs:
        p.join()
    latencies.sort()
    return statistics.median(latencies), latencies[int(len(latencies) * 0.99)]


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Daemon(Path(tmp), config='[log]\nlevel = "warning"\n')
        try:
            d.wait_ready()
            for i in range(8):
                ckpt = make_checkpoint(d.models / f"tiny-{i}", layers=4, hidden=16, vocab=32)
                with Client(socket=str(d.socket)) as c:
                    c.load_model(f"tiny-{i}", str(ckpt))
            print(f"Control plane: {PROCESSES * THREADS} concurrent clients, 8 models; {machine()}")
            base = measure(str(d.socket), "Health/Check")
            name = "Health/Check (base)"
            print(f"  {name:<28} p50 {base[0] * 1e3:7.2f} ms  p99 {base[1] * 1e3:7.2f} ms")
            for method in ("GetModel", "ListModels"):
                p50, p99 = measure(str(d.socket), method)
                print(
                    f"  {method:<28} p50 {p50 * 1e3:7.2f} ms  p99 {p99 * 1e3:7.2f} ms"
                    f"  ({p50 / base[0]:.2f}x / {p99 / base[1]:.2f}x the base; p99 target < 5 ms)"
                )
            with Client(socket=str(d.socket)) as c:
                trips = []
                gets = []
                for _ in range(max(args.runs, 50)):
                    start = time.perf_counter()
                    c.get_model("tiny-0")
                    gets.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    c.sleep_model("tiny-0", 1)
                    c.wake_model("tiny-0")
                    trips.append(time.perf_counter() - start)
                size = c.get_model("tiny-0").bytes.total_bytes
            trip, get = statistics.median(trips), statistics.median(gets)
            print(
                f"  Sleep+Wake round trip ({size / 1024:.0f} KiB model): {trip * 1e3:.2f} ms,"
                f" {trip / get:.1f}x a single GetModel ({get * 1e3:.2f} ms), one client"
            )
        finally:
            d.stop()


if __name__ == "__main__":
    main()
