"""Wake to the engine's first forward pass, and the engine's memory, against
an engine that reloads the weights itself with safetensors.

    python -m tests.bench.bench_engine [--dir DIR] [--runs N]

A TinyLM of ~1 GiB (8 blocks, hidden 2048, BF16) is held by a real torpord
(host backend). An engine process, attached and with its module built, waits
for the weights; the clock starts at the WakeModel call and stops when the
engine's first forward pass (one token) has returned:
  - level 1 (weights in the host pool) and level 2 (reloaded from the file),
  - with progressive wake (use(wait=False) and per-layer hooks: each block
    runs as soon as its layer is back) and without (use() waits for all).
Baselines: the same engine process, torch imported and module built, loads the
file with safetensors.torch.load_file (page cache warm), adopts the tensors
(load_state_dict(assign=True)) and runs the same forward pass: what an engine
does today to get its weights back without Torpor. A: as load_file gives them
on a CPU (views on an mmap of the cached file: no byte moves until used);
B: copied into the engine's own memory first, as load_file(device="cuda")
does on a GPU host and as the host backend's wake does. The forward pass alone is
shown too. Memory: what the weights add to the engine process's private
memory (and what it maps shared), with Torpor and with safetensors.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench.common import machine, parser

CONFIG = {"layers": 8, "hidden": 2048, "intermediate": 5504}
TOKEN = [[84]]


def checkpoint(root: Path) -> Path:
    from torpor.examples.tinylm import TinyConfig, make_checkpoint

    path = root / "tinylm-1g"
    marker = path / ".complete"
    if not marker.exists():
        print(f"generating a ~1 GiB TinyLM in {path} (once)...", flush=True)
        make_checkpoint(path, TinyConfig(**CONFIG), seed=1)
        marker.touch()
    return path / "model.safetensors"


def memory() -> dict[str, int]:
    """This process's private and shared resident memory, in bytes."""
    fields: dict[str, int] = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return {
        "private": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
        "shared": fields.get("Shared_Clean", 0) + fields.get("Shared_Dirty", 0),
    }


def engine(socket: str, model_id: str, path: str) -> None:
    """The engine process: answers commands on stdin with JSON lines."""
    import torch
    from safetensors.torch import load_file
    from torpor import Client
    from torpor.agent import attach
    from torpor.agent.modules import empty_parameters, load_module, wait_hooks
    from torpor.examples.tinylm import TinyConfig, TinyLM

    def say(value: dict[str, Any]) -> None:
        print(json.dumps(value), flush=True)

    token = torch.tensor(TOKEN)
    before = memory()
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "torpor":  # attach, build, one forward to warm up
            client = Client(socket=socket)
            attached = attach(model_id, client=client)
            with empty_parameters():
                model = TinyLM(TinyConfig.from_state_dict(attached.state_dict()))
            load_module(model, attached)
            wait_hooks(model, attached)
            with attached.use(), torch.inference_mode():
                model(token)
            after = memory()
            say({k: after[k] - before[k] for k in after})
        elif command == "wait":  # wait for the weights, run the first forward
            progressive = rest[0] == "1"
            say({"waiting": True})
            with attached.use(wait=not progressive), torch.inference_mode():
                model(token)
            say({"done": time.monotonic()})
        elif command == "forward":
            start = time.monotonic()
            with attached.use(), torch.inference_mode():
                model(token)
            say({"seconds": time.monotonic() - start})
        elif command == "reload":  # what an engine without Torpor does
            copy = rest[0] == "1"
            pre = memory()
            start = time.monotonic()
            state = load_file(path)
            if copy:  # into memory of its own, as load_file(device="cuda") does
                state = {name: t.clone() for name, t in state.items()}
            with empty_parameters():
                own = TinyLM(TinyConfig.from_state_dict(state))
            own.load_state_dict(state, assign=True)
            with torch.inference_mode():
                own(token)
            done = time.monotonic()
            after = memory()
            say({"seconds": done - start, **{k: after[k] - pre[k] for k in after}})
            del own, state
        elif command == "quit":
            return


def main() -> None:
    if sys.argv[1:2] == ["--engine"]:
        engine(*sys.argv[2:5])
        return
    from torpor import Client
    from torpor.v1 import common_pb2

    from tests.e2e.conftest import Daemon

    args = parser(__doc__ or "").parse_args()
    path = checkpoint(args.dir)
    size = path.stat().st_size
    with tempfile.TemporaryDirectory() as tmp:
        d = Daemon(
            Path(tmp),
            config='[log]\nlevel = "warning"\n',
            roots=(args.dir,),
            capacity="3GiB",
        )
        proc = None
        try:
            d.wait_ready()
            client = Client(socket=str(d.socket))
            client.load_model("tiny", str(path))
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.bench.bench_engine", "--engine", str(d.socket),
                 "tiny", str(path)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip

            def ask(command: str) -> dict[str, Any]:
                assert proc is not None and proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(command + "\n")
                proc.stdin.flush()
                value: dict[str, Any] = json.loads(proc.stdout.readline())
                return value

            with_torpor = ask("torpor")
            forward = statistics.median(ask("forward")["seconds"] for _ in range(args.runs))
            reloads = [ask("reload 0") for _ in range(args.runs)]
            base = statistics.median(r["seconds"] for r in reloads)
            copies = [ask("reload 1") for _ in range(args.runs)]
            copied = statistics.median(r["seconds"] for r in copies)
            print(
                f"Wake to first forward: TinyLM {size / 2**30:.2f} GiB BF16, 1 token, host"
                f" backend; {machine()}"
            )
            print(f"  {'forward pass alone':<48} {forward * 1e3:8.1f} ms")
            name = "safetensors load_file (mmap) + assign + forward"
            print(f"  {name:<48} {base * 1e3:8.1f} ms  (A)")
            name = "... with a copy into the engine's own memory"
            print(f"  {name:<48} {copied * 1e3:8.1f} ms  (B)")
            for level in (1, 2):
                for progressive in (False, True):
                    times = []
                    for _ in range(args.runs):
                        client.sleep_model("tiny", level=level)
                        assert ask(f"wait {int(progressive)}")["waiting"]
                        time.sleep(0.2)  # the engine is blocked on the weights by now
                        start = time.monotonic()
                        client.wake_model("tiny", wait=False)
                        assert proc.stdout is not None
                        done = json.loads(proc.stdout.readline())["done"]
                        times.append(done - start)
                        while client.get_model("tiny").state != common_pb2.MODEL_STATE_ACTIVE:
                            time.sleep(0.01)
                    t = statistics.median(times)
                    daemon = client.get_model("tiny").last_transition.duration.ToTimedelta()
                    how = "progressive" if progressive else "all layers first"
                    name = f"level {level} wake, {how}"
                    print(
                        f"  {name:<48} {t * 1e3:8.1f} ms  {base / t:5.2f}x A  {copied / t:5.2f}x B"
                        f"  (the daemon's last wake: {daemon.total_seconds() * 1e3:.0f} ms)"
                    )
            mib = 2**20
            reload_private = statistics.median(r["private"] for r in copies)
            print("Engine memory added by the weights:")
            print(
                f"  Torpor: private {with_torpor['private'] / mib:7.1f} MiB, shared (the"
                f" daemon's slabs, counted once on the node) {with_torpor['shared'] / mib:7.1f} MiB"
            )
            print(
                f"  safetensors, own copy: private {reload_private / mib:7.1f} MiB"
                f"  (Torpor's private memory is {with_torpor['private'] / reload_private:.3f}x)"
            )
            assert proc.stdin is not None
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            proc.wait(60)
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
            d.stop()


if __name__ == "__main__":
    main()
