"""torpord-sim: generate traces and replay them against the policies.

torpord-sim generate [--preset NAME] [generator options] --out DIR
    writes DIR/trace.csv and DIR/spec.json
torpord-sim run (--trace CSV --spec JSON | [--preset NAME] [generator options])
                [--policies torpor,keep-alive,...] [--idle-timeout S]
                [--acquire-patience S] [--retry-after S]
                [--table PATH] [--plot PATH]
    prints the markdown table (and writes it, and the PNG plot)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from pathlib import Path

from torpord.errors import TorporError
from torpord.policies import decide
from torpord.policies.activity import Activity
from torpord.sim.contenders import TORPOR_IDLE_TIMEOUT, Contender, contenders
from torpord.sim.engine import DEFAULT_ROUTER, Decisions, Outcome, Router, simulate
from torpord.sim.generate import PRESETS, Generator, generate
from torpord.sim.node import ActivityLike, PolicyViolation
from torpord.sim.report import PlotUnavailable, figures, plot, table
from torpord.sim.spec import NodeSpec, dump_spec, load_spec
from torpord.sim.trace import Request, format_trace, load_trace

__all__ = ["compare", "main"]

_KNOBS = {
    "models": (int, "how many models"),
    "zipf": (float, "Zipf exponent s of the popularity"),
    "rate": (float, "background requests per second (daily mean)"),
    "group_size": (int, "models per group that bursts together"),
    "burst_rate": (float, "bursts per hour"),
    "burst_length": (float, "mean burst length, seconds"),
    "burst_rps": (float, "requests per second during a burst"),
    "amplitude": (float, "daily cycle amplitude, 0 to <1"),
    "days": (float, "trace length in days"),
    "duration": (float, "median request duration, seconds"),
    "device_share": (float, "device memory as a share of all models' bytes"),
    "host_share": (float, "host memory as a share of all models' bytes"),
    "disk_gib": (float, "a disk cache of this many GiB (default: none)"),
    "seed": (int, "random seed"),
}


def _generator_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generator")
    g.add_argument("--preset", choices=sorted(PRESETS), default="default")
    for name, (kind, text) in _KNOBS.items():
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text)


def _generator(args: argparse.Namespace) -> Generator:
    chosen = {n: getattr(args, n) for n in _KNOBS if getattr(args, n) is not None}
    assert {f.name for f in fields(Generator)} >= set(chosen)
    return replace(PRESETS[args.preset], **chosen)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torpord-sim", description="Replay request traces against Torpor's policies."
    )
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write a synthetic trace and node spec")
    _generator_options(gen)
    gen.add_argument("--out", type=Path, required=True, help="directory for trace.csv, spec.json")
    run = sub.add_parser("run", help="replay a trace against each policy and compare")
    _generator_options(run)
    run.add_argument("--trace", type=Path, help="a trace CSV (with --spec; else one is generated)")
    run.add_argument("--spec", type=Path, help="the node and models spec (JSON)")
    run.add_argument(
        "--policies",
        default=",".join(c.name for c in contenders()),
        help="comma-separated, of: " + ", ".join(c.name for c in contenders()),
    )
    run.add_argument(
        "--idle-timeout",
        type=float,
        default=TORPOR_IDLE_TIMEOUT,
        help="Torpor's idle timeout, seconds (0 = never)",
    )
    run.add_argument(
        "--acquire-patience",
        type=float,
        default=DEFAULT_ROUTER.patience,
        help="seconds an Acquire waits for room before RESOURCE_EXHAUSTED (the daemon's "
        "[policy] acquire_patience; every policy gets the same)",
    )
    run.add_argument(
        "--retry-after",
        type=float,
        default=DEFAULT_ROUTER.retry_after,
        help="seconds the router waits after RESOURCE_EXHAUSTED before it asks again",
    )
    run.add_argument("--tick", type=float, default=10.0, help="housekeeping period, seconds")
    run.add_argument("--table", type=Path, help="also write the markdown table here")
    run.add_argument("--plot", type=Path, help="write the PNG plot here (needs matplotlib)")
    return p


def compare(
    spec: NodeSpec,
    requests: Sequence[Request],
    chosen: Sequence[Contender],
    *,
    decisions: Decisions = decide,
    activity: Callable[[], ActivityLike] = Activity,
    tick: float = 10.0,
    router: Router = DEFAULT_ROUTER,
) -> list[Outcome]:
    """Each contender's outcome on the trace; `no-oversub`'s device holds
    every model, the others have the spec's. All answer a request that
    finds no room as `router` says."""
    out = []
    for c in chosen:
        node = spec.resized(max(spec.device, spec.total_bytes)) if c.load_everything else spec
        out.append(
            simulate(
                c.name,
                node,
                requests,
                c.settings,
                decisions=decisions,
                activity=activity,
                tick=tick,
                load_everything=c.load_everything,
                router=router,
            )
        )
    return out


def _inputs(args: argparse.Namespace) -> tuple[NodeSpec, list[Request], str]:
    if (args.trace is None) != (args.spec is None):
        raise ValueError("--trace and --spec go together")
    if args.trace is not None:
        spec = load_spec(args.spec)
        return spec, load_trace(args.trace, [m.model_id for m in spec.models]), str(args.trace)
    spec, requests = generate(_generator(args))
    return spec, requests, f"generated ({args.preset}, seed {_generator(args).seed})"


def _run(args: argparse.Namespace) -> int:
    by_name = {c.name: c for c in contenders(args.idle_timeout)}
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise ValueError(f"--policies: expected names among {', '.join(by_name)}")
    router = Router(args.acquire_patience, args.retry_after)
    spec, requests, what = _inputs(args)
    started = time.perf_counter()
    outcomes = compare(spec, requests, [by_name[n] for n in names], tick=args.tick, router=router)
    rows = [figures(o) for o in outcomes]
    text = table(rows)
    gib = 2**30
    header = (
        f"{what}: {len(requests)} requests, {len(spec.models)} models "
        f"({spec.total_bytes / gib:.0f} GiB), device {spec.device / gib:.0f} GiB, "
        f"host {spec.host / gib:.0f} GiB, Torpor idle timeout {args.idle_timeout:g} s, "
        f"acquire patience {router.patience:g} s, router retry after {router.retry_after:g} s"
    )
    print(header)
    print(text, end="")
    print(f"(simulated in {time.perf_counter() - started:.1f} s)", file=sys.stderr)
    if args.table is not None:
        args.table.write_text(header + "\n\n" + text)
    if args.plot is not None:
        plot(rows, outcomes, args.plot, header)
    return 0


def _generate(args: argparse.Namespace) -> int:
    spec, requests = generate(_generator(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "spec.json").write_text(dump_spec(spec))
    (args.out / "trace.csv").write_text(format_trace(requests))
    print(f"{len(requests)} requests, {len(spec.models)} models -> {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args) if args.command == "run" else _generate(args)
    except (TorporError, ValueError, PlotUnavailable, OSError) as err:
        message = err.message if isinstance(err, TorporError) else str(err)
        print(f"torpord-sim: error: {message}", file=sys.stderr)
        return 2
    except PolicyViolation as err:
        print(f"torpord-sim: the policy did what the daemon would refuse: {err}", file=sys.stderr)
        return 1
