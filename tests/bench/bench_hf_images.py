"""A Hugging Face model's start to its first logits: transformers'
`from_pretrained` against Torpor's image of the same directory.

    python -m tests.bench.bench_hf_images [--dir DIR] [--runs N]

A Llama written by transformers' own `save_pretrained` (9 blocks, hidden
2048, BF16, ~1.1 GiB, sharded) is generated once under DIR. Each start runs
in a fresh process with torch, transformers and the model's code already
imported; the clock
runs from the loading call to the first logits (one token):
  - baseline: `AutoModelForCausalLM.from_pretrained(dir, dtype=bfloat16)`,
    page cache warm, and cold (the files evicted first: an engine starting
    on a node where nothing read them lately); it reads the files, converts
    and copies into its own memory;
  - Torpor, image hit: `torpor.agent.hf_images.from_pretrained(dir)` with
    the image already published by an earlier start (untimed): the module
    is built on `meta` and maps the daemon's slabs (host backend), no read
    of the weight files, no copy.
Also: the first start (the miss: load with transformers, publish, switch),
and each start's private memory. Ratios are the baseline's time over
Torpor's (above 1: Torpor is faster).
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

from tests.bench.common import evict, machine, parser, private_memory, warm

CONFIG = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 9,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "max_position_embeddings": 512,
}


def checkpoint(root: Path) -> Path:
    path = root / "hf-llama-1g"
    marker = path / ".complete"
    if not marker.exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        print(f"generating a ~1.1 GiB Llama in {path} (once)...", flush=True)
        torch.manual_seed(1)
        config = LlamaConfig(**CONFIG, dtype="bfloat16")
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(path, max_shard_size="300MB")
        marker.touch()
    return path


def start(how: str, path: str, socket: str) -> None:
    """One engine start (a process of its own): prints seconds and memory."""
    import torch
    from torpor import Client
    from torpor.agent.hf_images import from_pretrained

    # Imported before the clock, for both: the model's code (transformers
    # imports it lazily, at its first use: a second or so here) is not what
    # is measured.
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    token = torch.tensor([[1]])
    client = Client(socket=socket)
    before = private_memory()
    begin = time.perf_counter()
    if how == "transformers":
        module = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        with torch.inference_mode():
            logits = module(token).logits
    else:
        module = from_pretrained(path, dtype=torch.bfloat16, client=client)
        with module.torpor_model.use(), torch.inference_mode():
            logits = module(token).logits
    seconds = time.perf_counter() - begin
    print(
        json.dumps(
            {
                "seconds": seconds,
                "private": private_memory() - before,
                "sum": float(logits.float().sum()),
            }
        ),
        flush=True,
    )


def run(how: str, path: Path, socket: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "tests.bench.bench_hf_images", "--start", how, str(path), socket],
        capture_output=True,
        text=True,
        check=True,
    )
    value: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return value


def main() -> None:
    if sys.argv[1:2] == ["--start"]:
        start(*sys.argv[2:5])
        return
    from tests.e2e.conftest import Daemon

    args = parser(__doc__ or "").parse_args()
    path = checkpoint(args.dir)
    files = sorted(path.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    with tempfile.TemporaryDirectory() as tmp:
        d = Daemon(
            Path(tmp), config='[log]\nlevel = "warning"\n', roots=(args.dir,), capacity="4GiB"
        )
        try:
            d.wait_ready()
            warm(files)
            miss = run("torpor", path, str(d.socket))  # publishes the image
            base = [run("transformers", path, str(d.socket)) for _ in range(args.runs)]
            cold = []
            for _ in range(args.runs):
                evict(files)
                cold.append(run("transformers", path, str(d.socket)))
            hits = [run("torpor", path, str(d.socket)) for _ in range(args.runs)]
        finally:
            d.kill()
    assert all(r["sum"] == base[0]["sum"] for r in [miss, *base, *cold, *hits]), "logits differ"
    b = statistics.median(r["seconds"] for r in base)
    c = statistics.median(r["seconds"] for r in cold)
    h = statistics.median(r["seconds"] for r in hits)
    mib = 2**20
    bp = statistics.median(r["private"] for r in base)
    hp = statistics.median(r["private"] for r in hits)
    print(f"HF start to first logits: Llama {size / 2**30:.2f} GiB BF16, host backend; {machine()}")
    print(f"  {'transformers from_pretrained (warm cache)':<44} {b * 1e3:8.0f} ms")
    print(f"  {'transformers from_pretrained (cold cache)':<44} {c * 1e3:8.0f} ms")
    print(f"  {'Torpor, image hit':<44} {h * 1e3:8.0f} ms  {b / h:6.2f}x warm, {c / h:.2f}x cold")
    print(f"  {'Torpor, first start (load, publish, switch)':<44} {miss['seconds'] * 1e3:8.0f} ms"
          f"  {b / miss['seconds']:6.2f}x")  # fmt: skip
    print(f"  private memory: transformers {bp / mib:.0f} MiB, Torpor hit {hp / mib:.0f} MiB"
          f" ({hp / bp:.2f}x)")  # fmt: skip
    print("  (logits identical in every start)")


if __name__ == "__main__":
    main()
