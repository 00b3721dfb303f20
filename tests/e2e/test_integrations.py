"""Engines as users build them: a Hugging Face model on the daemon's weights,
and the example engine answering through sleep/wake cycles from torporctl."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .conftest import Daemon

torch = pytest.importorskip("torch")

from torpor import Client  # noqa: E402
from torpor.agent import attach  # noqa: E402
from torpor.agent.modules import from_transformers  # noqa: E402
from torpor.examples.tinylm import TinyConfig, make_checkpoint  # noqa: E402


@pytest.mark.parametrize("tied", [False, True])
def test_a_transformers_model_runs_on_the_daemons_weights(daemon: Daemon, tied: bool) -> None:
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    original = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    state = {name: t.contiguous() for name, t in original.state_dict().items()}
    if tied:
        del state["lm_head.weight"]  # as save_pretrained writes a tied model
    path = daemon.models / "llama.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.inference_mode():
        expected = original(ids).logits

    with Client(socket=str(daemon.socket)) as client:
        client.load_model("llama", str(path))
        with attach("llama", client=client) as model:
            hf = from_transformers(config, model)
            # No copy: every parameter lives in one of the daemon's slabs.
            ranges = model.ranges().values()
            for name, p in hf.named_parameters():
                assert any(a <= p.data_ptr() < a + n for a, n in ranges), name
            if tied:
                assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
            with model.use(wait=False), torch.inference_mode():
                assert torch.equal(hf(ids).logits, expected)
            client.sleep_model("llama", level=2)
            assert not model.ready()
            client.wake_model("llama")
            with model.use(wait=False), torch.inference_mode():
                assert torch.equal(hf(ids).logits, expected)
            hooks = hf.torpor_hooks.layers  # each submodule waits for its own layer
            assert hooks["model.embed_tokens"] == ["pre"]
            assert hooks["model.layers.1.self_attn.q_proj"] == ["layers.1"]
            assert hooks["lm_head"] == (["pre"] if tied else ["post"])


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=120) as answer:
        value: dict[str, Any] = json.loads(answer.read())
        return value


def test_the_example_engine_answers_the_same_through_sleep_and_wake(daemon: Daemon) -> None:
    path = make_checkpoint(
        daemon.models / "tiny", TinyConfig(layers=2, hidden=64, intermediate=176)
    )
    daemon.ctl("load", "tiny", str(path))
    engine = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torpor.examples.engine",
            "tiny",
            "--socket",
            str(daemon.socket),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert engine.stdout is not None
        url = json.loads(engine.stdout.readline())["listening"]
        ask = {"prompt": "Once upon a time", "max_tokens": 12}
        first = _post(url + "/generate", ask)
        assert len(first["tokens"]) == 12
        for level in ("1", "2", "1"):
            daemon.ctl("sleep", "tiny", "--level", level)
            health = json.loads(urllib.request.urlopen(url + "/health", timeout=30).read())
            assert health["attached"] and not health["ready"]
            daemon.ctl("wake", "tiny")
            assert _post(url + "/generate", ask) == first
        # A request sent while the model sleeps is answered once it wakes.
        daemon.ctl("sleep", "tiny")
        waiting = subprocess.Popen(
            [sys.executable, "-c", "import sys, urllib.request; print(urllib.request.urlopen("
             "urllib.request.Request(sys.argv[1], data=sys.argv[2].encode())).read().decode())",
             url + "/generate", json.dumps(ask)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1)
        assert waiting.poll() is None  # still waiting for the weights
        daemon.ctl("wake", "tiny")
        out, _ = waiting.communicate(timeout=120)
        assert json.loads(out) == first
    finally:
        engine.terminate()
        engine.communicate(timeout=30)


def test_the_example_checkpoint_command_writes_a_loadable_model(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "torpor.examples.tinylm", str(tmp_path / "m"), "--layers", "2",
         "--hidden", "64"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    from safetensors.torch import load_file

    state = load_file(out.stdout.strip())
    assert TinyConfig.from_state_dict(state).layers == 2
