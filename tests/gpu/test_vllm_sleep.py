"""vLLM's own sleep mode on a Torpor image, on a GPU: `LLM(...,
load_format="torpor", enable_sleep_mode=True)` selects the `torpor`
sleep-mode backend, `llm.sleep(level)` has the daemon put the image to sleep
(ASLEEP, the engine let go of it), `llm.wake_up()` brings it back at the
same addresses, and the greedy tokens are the same before and after, at
levels 1 and 2 (level 2 through the daemon's disk cache).

Skipped without a GPU, CuPy and cuda-bindings (the daemon's CUDA backend)
and without vLLM (a CUDA build; tests/gpu/run.sh runs it where one is
installed). vLLM runs in a script, in one process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), which registers the plugin itself:
torpor need not be installed for vLLM to find its entry point."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
pytest.importorskip("cupy")
pytest.importorskip("cuda.bindings.driver")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed", allow_module_level=True)

from tests.e2e.conftest import Daemon  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

ENGINE = textwrap.dedent(
    """
    import json, sys
    import torpor.vllm
    from torpor import Client
    from torpor.v1 import common_pb2
    from vllm import LLM, SamplingParams

    socket, model = sys.argv[1], sys.argv[2]
    PROMPTS = [{"prompt_token_ids": [1, 5, 9, 30, 100, 7]}, {"prompt_token_ids": [3, 200, 17]}]

    def generate(llm):
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def image(client):
        (found,) = client.list_models()
        return {"state": common_pb2.ModelState.Name(found.state),
                "level": found.sleep_level, "engines": found.engines}

    def main():
        torpor.vllm.register()
        client = Client(socket=socket)
        llm = LLM(model=model, load_format="torpor", model_loader_extra_config={"socket": socket},
                  enable_sleep_mode=True, dtype="bfloat16", enforce_eager=True,
                  skip_tokenizer_init=True, gpu_memory_utilization=0.2,
                  kv_cache_memory_bytes=256 << 20, max_model_len=256, max_num_seqs=4)
        config = llm.llm_engine.vllm_config.model_config
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        attached = runner.model.torpor_image
        addresses = sorted(p.data_ptr() for p in runner.model.parameters() if p.numel())
        out = {"backend": config.sleep_mode_backend, "tokens": generate(llm),
               "awake": image(client), "cycles": []}
        for level in (1, 2, 1):
            llm.sleep(level=level)
            asleep = image(client)
            mapped = attached.ready()
            llm.wake_up()
            again = sorted(p.data_ptr() for p in runner.model.parameters() if p.numel())
            out["cycles"].append({"level": level, "asleep": asleep, "mapped_asleep": mapped,
                                  "awake": image(client), "tokens": generate(llm),
                                  "same_addresses": again == addresses})
        print("RESULT " + json.dumps(out), flush=True)

    if __name__ == "__main__":
        main()
    """
)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    d = Daemon(
        tmp_path,
        config=f'[backend.cuda]\ndevice_memory = "4GiB"\n'
        f'[disk_cache]\npath = "{cache}"\ncapacity = "1GiB"\n',
        args=("--backend", "cuda"),
        capacity="2GiB",
    )
    try:
        d.wait_ready()
        yield d
    finally:
        d.kill()


def test_vllm_sleep_and_wake_up_go_through_torpor(daemon: Daemon, tmp_path: Path) -> None:
    models = tmp_path / "models"
    subprocess.run(
        [sys.executable, str(ROOT / "tests" / "vllm" / "make_models.py"), str(models), "llama"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    script = tmp_path / "engine.py"
    script.write_text(ENGINE)
    env = {
        **daemon.env,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_LOGGING_STREAM": "ext://sys.stderr",
    }
    run = subprocess.run(
        [sys.executable, str(script), str(daemon.socket), str(models / "llama")],
        capture_output=True,
        text=True,
        env=env,
        timeout=110,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-6000:]
    got = json.loads(lines[-1].removeprefix("RESULT "))
    assert got["backend"] == "torpor"
    assert got["awake"] == {"state": "MODEL_STATE_ACTIVE", "level": 0, "engines": 1}
    for cycle in got["cycles"]:
        # The daemon put the image to sleep: the engine let go of it.
        assert cycle["asleep"] == {
            "state": "MODEL_STATE_ASLEEP",
            "level": cycle["level"],
            "engines": 0,
        }, cycle
        assert cycle["mapped_asleep"] is False
        assert cycle["awake"] == got["awake"], cycle
        assert cycle["same_addresses"] is True, cycle
        assert cycle["tokens"] == got["tokens"], cycle
