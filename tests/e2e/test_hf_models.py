"""Hugging Face models on the daemon's weights, as a user writes them: tiny
random models saved (sharded) by transformers' own `save_pretrained`, loaded
by a real daemon, built with `from_transformers` or `load_module`, and held
to what `from_pretrained` gives on the same directory, bit for bit, or to a
clear refusal. Never a wrong output without an error."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Daemon

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torpor import Client  # noqa: E402
from torpor.agent import AttachedModel, attach  # noqa: E402
from torpor.agent.modules import empty_parameters, from_transformers, load_module  # noqa: E402

from .hfmodels import ATTENTION, SMALL, auto_class, configs, output, save  # noqa: E402


class Models:
    """One daemon for the module's tests (a checkpoint per model id under its
    models root), a client to it, and the attachments, kept until the end:
    pytest shows a failing frame's arguments after the test returns, and a
    tensor of a closed attachment faults when read."""

    def __init__(self, daemon: Daemon, client: Client) -> None:
        self.daemon = daemon
        self.client = client
        self.attached: list[AttachedModel] = []

    def save(self, name: str, config: Any, dtype: torch.dtype = torch.bfloat16) -> Path:
        """A random model of `config` as `save_pretrained` writes it, in shards."""
        return save(self.daemon.models / name, config, dtype)

    def attach(self, name: str, path: Path) -> AttachedModel:
        self.client.load_model(name, str(path))
        self.attached.append(attach(name, client=self.client))
        return self.attached[-1]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Models]:
    d = Daemon(tmp_path_factory.mktemp("hf"))
    try:
        d.wait_ready()
        with Client(socket=str(d.socket)) as client:
            models = Models(d, client)
            try:
                yield models
            finally:
                for model in models.attached:
                    model.close()
    finally:
        d.kill()


def assert_same_as_from_pretrained(model: AttachedModel, path: Path) -> Any:
    """from_transformers on the daemon's model against from_pretrained on its
    directory: the same output, bit for bit, from the daemon's tensors."""
    config = transformers.AutoConfig.from_pretrained(path)
    encoder = config.model_type == "bert"
    reference = auto_class(config).from_pretrained(path).eval()
    mine = from_transformers(config, model, model_class=auto_class(config))
    ranges = model.ranges().values()
    for name, p in mine.named_parameters():  # no copy: each in one of the slabs
        assert any(a <= p.data_ptr() < a + n for a, n in ranges), name
    with model.use(wait=False):
        got = output(mine, encoder)
    want = output(reference, encoder)
    assert got.dtype == want.dtype
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()
    return mine


@pytest.mark.parametrize(
    ("family", "dtype"),
    [
        ("llama", torch.float32),
        *[
            (family, torch.bfloat16)
            for family in (
                "llama",
                "qwen2",
                "mistral",
                "gpt2",
                "gemma",
                "gemma2",
                "phi3",
                "opt",
                "gpt_neox",
                "bert",
            )
        ],
    ],
)
def test_from_transformers_gives_what_from_pretrained_gives(
    models: Models, family: str, dtype: torch.dtype
) -> None:
    name = f"{family}-{str(dtype).removeprefix('torch.')}"
    path = models.save(name, configs()[family], dtype)
    model = models.attach(name, path)
    mine = assert_same_as_from_pretrained(model, path)
    if family == "gpt_neox":  # checkpoint's embed_out, transformers' lm_head
        assert "embed_out.weight" in model.state_dict()
        assert mine.get_output_embeddings().weight.data_ptr() == (
            model.state_dict()["embed_out.weight"].data_ptr()
        )


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_a_model_whose_experts_transformers_fuses_is_refused(models: Models, family: str) -> None:
    path = models.save(family, configs()[family])
    model = models.attach(family, path)
    config = transformers.AutoConfig.from_pretrained(path)
    with pytest.raises(ValueError, match=r"converts .* image") as refused:
        from_transformers(config, model)
    assert repr(family) in str(refused.value)
    assert "experts.0." in str(refused.value)  # a tensor it names


def tie_in_config(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(config))


def test_a_checkpoint_with_two_tensors_is_never_tied_by_its_config(models: Models) -> None:
    """The config says tied, the checkpoint holds a head that is not the
    embedding: from_pretrained uses both; so must we (it re-tied them)."""
    config = transformers.LlamaConfig(**SMALL, **ATTENTION, tie_word_embeddings=False)
    path = models.save("two-tensors", config)
    tie_in_config(path)
    model = models.attach("two-tensors", path)
    state = model.state_dict()
    with model.use():
        assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    mine = assert_same_as_from_pretrained(model, path)
    assert mine.lm_head.weight.data_ptr() == state["lm_head.weight"].data_ptr()
    assert mine.model.embed_tokens.weight.data_ptr() == (
        state["model.embed_tokens.weight"].data_ptr()
    )
    assert "lm_head.weight" not in mine.all_tied_weights_keys  # as from_pretrained


def test_a_tied_checkpoint_holding_only_the_head_ties_the_embedding_to_it(
    models: Models,
) -> None:
    """from_pretrained ties symmetrically: the head is the tensor the
    checkpoint has, and the embedding follows it."""
    from safetensors.torch import load_file, save_file

    config = transformers.LlamaConfig(**SMALL, **ATTENTION, tie_word_embeddings=True)
    path = models.save("only-head", config)
    for shard in path.glob("*.safetensors"):  # rename the embedding to the head
        state = load_file(shard)
        if "model.embed_tokens.weight" in state:
            state["lm_head.weight"] = state.pop("model.embed_tokens.weight")
            save_file(state, shard, metadata={"format": "pt"})
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = index["weight_map"].pop("model.embed_tokens.weight")
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = models.attach("only-head", path)
    mine = assert_same_as_from_pretrained(model, path)
    head = model.state_dict()["lm_head.weight"].data_ptr()
    assert mine.model.embed_tokens.weight.data_ptr() == head


def hub_bert(models: Models, name: str) -> Path:
    """A BERT checkpoint as the Hub has them (all-MiniLM-L6-v2 among them): one
    file that also holds the int64 `embeddings.position_ids` buffer, first."""
    from safetensors.torch import load_file, save_file

    path = models.save(name, configs()["bert"], torch.float32)
    state = {"embeddings.position_ids": torch.arange(512).expand((1, -1)).contiguous()}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(shard))
        shard.unlink()
    (path / "model.safetensors.index.json").unlink()
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_the_dtype_is_the_configs_not_the_first_tensors(models: Models) -> None:
    path = hub_bert(models, "bert-hub")
    model = models.attach("bert-hub", path)
    assert next(iter(model.state_dict().values())).dtype == torch.int64
    mine = assert_same_as_from_pretrained(model, path)
    assert mine.dtype == torch.float32


def test_a_config_dtype_other_than_the_checkpoints_is_refused(models: Models) -> None:
    """from_pretrained casts to the config's dtype; the daemon's read-only
    tensors cannot be cast, so the answer is an error, not other logits."""
    path = models.save("cast", configs()["llama"], torch.bfloat16)
    config = json.loads((path / "config.json").read_text())
    config["dtype"] = "float32"
    (path / "config.json").write_text(json.dumps(config))
    model = models.attach("cast", path)
    with pytest.raises(ValueError, match=r"'cast' has .* torch.bfloat16.* torch.float32"):
        from_transformers(transformers.AutoConfig.from_pretrained(path), model)


def empty(config: Any) -> Any:
    with empty_parameters():
        return auto_class(config).from_config(config)


def test_load_module_strict_takes_a_tied_model_and_bert(models: Models) -> None:
    config = transformers.LlamaConfig(**SMALL, **ATTENTION, tie_word_embeddings=True)
    path = models.save("strict-tied", config)
    model = models.attach("strict-tied", path)
    assert "lm_head.weight" not in model.state_dict()  # as save_pretrained writes it
    module = empty(config)
    assert load_module(module, model) == ([], [])
    assert module.lm_head.weight is module.model.embed_tokens.weight
    embedding = model.state_dict()["model.embed_tokens.weight"]
    assert module.lm_head.weight.data_ptr() == embedding.data_ptr()
    with model.use():
        want = output(transformers.AutoModelForCausalLM.from_pretrained(path), False)
        assert torch.equal(output(module.eval(), False), want)

    path = hub_bert(models, "strict-bert")
    model = models.attach("strict-bert", path)
    module = empty(configs()["bert"])
    assert load_module(module, model) == ([], [])
    # The checkpoint's buffer is the daemon's too.
    ids = module.embeddings.position_ids
    assert ids.data_ptr() == model.state_dict()["embeddings.position_ids"].data_ptr()


def test_load_module_strict_names_what_is_missing_or_unexpected(models: Models) -> None:
    config = configs()["llama"]
    path = models.save("strict-bad", config)
    model = models.attach("strict-bad", path)
    wider = empty(config)
    wider.extra = torch.nn.Linear(2, 2)  # a parameter the checkpoint lacks
    with pytest.raises(ValueError, match=r"'strict-bad'.*no tensor for extra.weight"):
        load_module(wider, model)
    narrower = empty(config)
    del narrower.lm_head  # a tensor the module has no place for
    with pytest.raises(ValueError, match=r"'strict-bad'.*no place for lm_head.weight"):
        load_module(narrower, model)
    other = transformers.LlamaConfig(**{**SMALL, "vocab_size": 256}, **ATTENTION)
    with pytest.raises(ValueError, match=r"'strict-bad' has model.embed_tokens.weight of shape"):
        load_module(empty(other), model, strict=False)
    assert load_module(empty(config), model, strict=False) == ([], [])
