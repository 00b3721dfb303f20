"""The `torpor` sleep-mode backend in real vLLM (run by the vLLM
environment's python, never inside pytest):
python sleep_backend.py --socket S --model DIR

Prints one `RESULT {json}` line: what vLLM's factory makes of the backend
once the plugin registered it, what `select` does to a real ModelConfig,
and the backend object, made as vLLM makes it (no arguments), putting to
sleep and waking a real image that a guarded model serves."""

import argparse
import gc
import json
from types import SimpleNamespace
from typing import Any


def factory() -> dict[str, Any]:
    import torpor.vllm
    from torpor.vllm.sleep import TorporSleepBackend
    from vllm.device_allocator.sleep_mode_backend import (
        SleepModeBackend,
        SleepModeBackendFactory,
    )

    torpor.vllm.register()
    torpor.vllm.register()  # (vLLM calls it in several places: idempotent)
    found = SleepModeBackendFactory.get_backend_class("torpor")
    out: dict[str, Any] = {
        "registered": found is TorporSleepBackend and issubclass(found, SleepModeBackend),
        "supported": found.is_supported(),
        "cumem_still": SleepModeBackendFactory.get_backend_class("cumem").__name__,
    }
    try:
        SleepModeBackendFactory.create_backend(SimpleNamespace(sleep_mode_backend="torpor"))
        out["create"] = "made"
    except ValueError as err:
        out["create"] = str(err)
    return out


def selecting(model: str) -> dict[str, Any]:
    from torpor.vllm.sleep import select
    from vllm.config import ModelConfig

    config = ModelConfig(model=model, skip_tokenizer_init=True, dtype="bfloat16")
    out: dict[str, Any] = {"default": config.sleep_mode_backend}
    out["cpu"] = [select(config), config.sleep_mode_backend]
    out["cuda_no_sleep_mode"] = [select(config, cuda=True), config.sleep_mode_backend]
    config.enable_sleep_mode = True  # (vLLM refuses it on a CPU: set after)
    out["cuda"] = [select(config, cuda=True), config.sleep_mode_backend]
    config.sleep_mode_backend = "cuda_checkpoint"
    out["other_chosen"] = [select(config, cuda=True), config.sleep_mode_backend]
    config.sleep_mode_backend = "cumem"
    config.sleep_preserve_parameter_names = ["*.engram.*"]
    try:
        select(config, cuda=True)
        out["preserve"] = "selected"
    except ValueError as err:
        out["preserve"] = str(err)
    return out


def sleeping(socket: str) -> dict[str, Any]:
    import torch
    from torpor import Client
    from torpor.agent.publish import groups_of, publish
    from torpor.v1 import common_pb2
    from torpor.vllm import gate
    from torpor.vllm.sleep import TorporSleepBackend

    client = Client(socket=socket)
    want = {f"model.layers.{i}.w": torch.full((4096,), float(i)) for i in range(2)}
    attached = publish("img", "fp-sleep", groups_of(want), client=client)
    module = torch.nn.Linear(2, 2)
    gate.guard(module, gate.Image(attached, client, "fp-sleep", wait_s=60))
    backend = TorporSleepBackend()  # (as vLLM's factory makes it)
    out: dict[str, Any] = {"states": [backend.state()]}

    def daemon() -> list[Any]:
        model = client.get_model("img")
        return [common_pb2.ModelState.Name(model.state), model.engines]

    backend.suspend(1)
    out["states"].append(backend.state())
    out["asleep"] = daemon()
    backend.resume(None)
    out["states"].append(backend.state())
    out["awake"] = daemon()
    with attached.use(timeout=30):
        got = attached.state_dict()
        out["same"] = all(torch.equal(got[k], want[k]) for k in want)
    del module
    gc.collect()
    out["serving_after_the_model_went"] = len(gate.serving())
    attached.close()
    client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    result = {
        "factory": factory(),
        "select": selecting(args.model),
        "sleep": sleeping(args.socket),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
