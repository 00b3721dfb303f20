"""vLLM engines (run by the vLLM environment's python, never inside
pytest): python engine.py [--socket S] [--serve] [--pause-publish] MODEL=FORMAT...

For each model and load format in turn (one engine after the other, in
this process) prints a `RESULT {json}` line: the greedy tokens of two fixed
prompts and, for `torpor` in a single-process engine, how many parameters
lie in the image's mapped ranges. With --serve, the last engine then
answers once per `generate` line read on stdin (until `quit`).

--pause-publish stops a publishing engine once its image's slabs are
written, before the commit, and says `PUBLISHING <model id>` (the tests
kill it there); it only wraps the real commit and changes nothing else."""

import argparse
import gc
import json
import os
import sys
from typing import Any

PROMPTS = [{"prompt_token_ids": [1, 5, 9, 30, 100, 7]}, {"prompt_token_ids": [3, 200, 17]}]


def say(what: object) -> None:
    print("RESULT " + json.dumps(what), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", metavar="MODEL=FORMAT")
    parser.add_argument("--socket")
    parser.add_argument("--extra", help="model_loader_extra_config (JSON) instead of --socket's")
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--pause-publish", action="store_true")
    args = parser.parse_args()
    if args.pause_publish:
        from torpor.agent.attach import AttachedModel

        commit = AttachedModel.commit

        def paused(self: AttachedModel) -> None:
            print("PUBLISHING " + self.model_id, flush=True)
            sys.stdin.readline()
            commit(self)

        AttachedModel.commit = paused  # type: ignore[method-assign]

    for i, run in enumerate(args.runs):
        model, _, load_format = run.rpartition("=")
        extra = {"socket": args.socket} if args.socket else {}
        if args.extra is not None:
            extra = json.loads(args.extra)
        llm = engine(model, load_format, extra)
        tokens = generate(llm)
        say({"run": run, "tokens": tokens, **in_image(llm, load_format)})
        if i < len(args.runs) - 1:
            llm.llm_engine.engine_core.shutdown()
            llm = None
            close()
    if args.serve:
        for line in sys.stdin:
            if line.strip() == "quit":
                break
            say({"tokens": generate(llm)})


def engine(model: str, load_format: str, extra: dict[str, Any]) -> Any:
    from vllm import LLM

    return LLM(
        model=model,
        load_format=load_format,
        model_loader_extra_config=extra if load_format == "torpor" else {},
        dtype="bfloat16",
        enforce_eager=True,
        skip_tokenizer_init=True,
        gpu_memory_utilization=0.05,
        kv_cache_memory_bytes=32 << 20,
        max_model_len=256,
        max_num_seqs=4,
    )


def generate(llm: Any) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def in_image(llm: Any, load_format: str) -> dict[str, Any]:
    """Whether the single-process engine's parameters all lie in the image."""
    if load_format != "torpor" or os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        return {}
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    ranges = list(model.torpor_image.ranges().values())
    params = [p for p in model.parameters() if p.numel()]
    inside = [any(a <= p.data_ptr() < a + n for a, n in ranges) for p in params]
    return {"params": len(params), "params_in_image": sum(inside)}


def close() -> None:
    """After an engine ended: let the next start in this process."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()


if __name__ == "__main__":
    main()
