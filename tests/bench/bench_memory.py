"""Daemon memory: resident memory beyond its pools while it holds a ~2.2 GiB model,
and resident memory and open fds after 200 Load/Sleep/Wake/Unload cycles.

    python -m tests.bench.bench_memory [--dir DIR] [--cycles N]

Baseline, measured in the same run: the same daemon, idle, just started.
"Beyond its pools" is the daemon's RSS less its shared memory (the memfd
slabs are shmem): RssAnon + RssFile from /proc/<pid>/status.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torpor import Client
from torpor.testing import make_checkpoint

from tests.bench.common import GiB, big_checkpoint, machine, parser
from tests.e2e.conftest import Daemon


def status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def own(s: dict[str, int]) -> int:
    return s["RssAnon"] + s["RssFile"]


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--cycles", type=int, default=200)
    args = p.parse_args()
    big = big_checkpoint(args.dir).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        d = Daemon(
            Path(tmp),
            config='[log]\nlevel = "warning"\n',
            roots=(args.dir.resolve(),),
            capacity="3GiB",
        )
        try:
            d.wait_ready()
            pid = d.proc.pid
            with Client(socket=str(d.socket)) as c:
                idle = status(pid)
                c.load_model("big", str(big))
                held = status(pid)
                c.unload_model("big")
                print(f"Daemon memory; {machine()}")
                print(
                    f"  idle daemon (base): RSS {idle['VmRSS'] / 2**20:.1f} MiB,"
                    f" {own(idle) / 2**20:.1f} MiB beyond pools, {idle['fds']} fds"
                )
                print(
                    f"  holding a {held['RssShmem'] / GiB:.2f} GiB model: beyond pools"
                    f" {own(held) / 2**20:.1f} MiB = {own(held) / own(idle):.2f}x the base"
                    f" (+{(own(held) - own(idle)) / 2**20:.1f} MiB)"
                )
                small = make_checkpoint(d.models / "small", layers=8, hidden=256, shards=2)
                c.load_model("small", str(small))
                c.unload_model("small")
                before = status(pid)
                for _ in range(args.cycles):
                    c.load_model("small", str(small))
                    c.sleep_model("small", 1)
                    c.wake_model("small")
                    c.sleep_model("small", 2)
                    c.wake_model("small")
                    c.unload_model("small")
                after = status(pid)
                print(
                    f"  after {args.cycles} Load/Sleep/Wake/Sleep 2/Wake/Unload cycles:"
                    f" beyond pools {own(after) / 2**20:.1f} MiB ="
                    f" {own(after) / own(before):.2f}x before the cycles;"
                    f" fds {after['fds']} (before {before['fds']}); shmem"
                    f" {after['RssShmem'] / 2**20:.1f} MiB"
                )
        finally:
            d.stop()


if __name__ == "__main__":
    main()
