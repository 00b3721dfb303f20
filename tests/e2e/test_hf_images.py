"""Hugging Face models of every architecture on images, under a real torpord:
`torpor.agent.hf_images.from_pretrained` on directories written by
transformers' own `save_pretrained`, held bit for bit to plain
`from_pretrained` on the first start (transformers loads, the weights are
published) and on later ones (the image is mapped: the weight files are
not read, which the tests prove by garbling them)."""

from __future__ import annotations

import gc
import os
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest

from .conftest import Daemon
from .observe import used

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torpor import Client  # noqa: E402
from torpor.agent import AttachedModel  # noqa: E402
from torpor.agent.hf_fingerprint import fingerprint, image_id  # noqa: E402
from torpor.agent.hf_images import from_pretrained  # noqa: E402
from torpor.agent.publish import groups_of, publish, publish_request  # noqa: E402
from torpor.errors import TorporError  # noqa: E402
from torpor.v1 import common_pb2  # noqa: E402

from .hfmodels import ATTENTION, SMALL, auto_class, configs, output, save  # noqa: E402

CAUSAL = transformers.AutoModelForCausalLM


class Images:
    """One daemon for the module's tests, a client to it, and the modules
    built, closed at the end (a closed attachment's tensors fault when read,
    and pytest shows a failing frame's locals after the test returns)."""

    def __init__(self, daemon: Daemon, client: Client) -> None:
        self.daemon = daemon
        self.client = client
        self.attached: list[AttachedModel] = []

    def load(self, path: Path, **kwargs: Any) -> Any:
        module = from_pretrained(path, client=self.client, **kwargs)
        self.attached.append(module.torpor_model)
        return module


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    root = tmp_path_factory.mktemp("hfimg")
    cache = root / "cache"
    cache.mkdir(mode=0o700)
    disk = f'[disk_cache]\npath = "{cache}"\ncapacity = "256MiB"\n'
    d = Daemon(root, capacity="1GiB", config=disk)
    try:
        d.wait_ready()
        with Client(socket=str(d.socket)) as client:
            images = Images(d, client)
            try:
                yield images
            finally:
                for model in images.attached:
                    model.close()
    finally:
        d.kill()


def garble(path: Path) -> None:
    """Overwrite every weight file with random bytes, keeping its size, inode
    and mtime (so its fingerprint), and take away every permission: a start
    that read one would fail or compute something else (root ignores the
    permissions; nobody ignores the garbage)."""
    for shard in path.glob("*.safetensors"):
        before = shard.stat()
        with open(shard, "r+b") as f:
            f.write(os.urandom(before.st_size))
        os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
        shard.chmod(0)
        after = shard.stat()
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
            before.st_ino,
            before.st_size,
            before.st_mtime_ns,
        )


def in_slabs(module: Any) -> bool:
    """Whether every parameter and persistent buffer lies in the daemon's slabs."""
    ranges = module.torpor_model.ranges().values()
    return all(
        any(a <= t.data_ptr() < a + n for a, n in ranges)
        for t in module.state_dict().values()
        if t.numel()
    )


def run(module: Any, encoder: bool) -> torch.Tensor:
    with module.torpor_model.use(wait=False):  # (progressive: each layer waits for itself)
        return output(module, encoder)


def same(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.dtype == want.dtype and torch.equal(got, want)


def tied(module: Any) -> bool:
    head = module.get_output_embeddings()
    return head is not None and head.weight is module.get_input_embeddings().weight


FAMILIES = [
    "llama",
    "qwen2",
    "mistral",
    "mixtral",
    "qwen2_moe",
    "gpt2",
    "gpt_neox",
    "gemma2",
    "phi3",
    "opt",
    "deepseek_v3",
    "bert",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_first_and_a_later_start_give_what_from_pretrained_gives(
    images: Images, family: str
) -> None:
    config = configs()[family]
    encoder = family == "bert"
    cls = auto_class(config)
    path = save(images.daemon.root / family, config, shards=family != "llama")
    reference = cls.from_pretrained(path).eval()
    want = output(reference, encoder)

    first = images.load(path, model_class=cls)
    key = fingerprint(path, model_class=cls)
    assert first.torpor_model.model_id == image_id(key)
    assert images.client.get_model(image_id(key)).fingerprint == key
    assert in_slabs(first)
    assert same(run(first, encoder), want)
    assert tied(first) == tied(reference)
    memory = used(images.client)

    garble(path)
    with pytest.raises(Exception):  # noqa: B017 (whatever safetensors raises)
        cls.from_pretrained(path)
    second = images.load(path, model_class=cls)
    assert second.torpor_model.model_id == image_id(key)  # the same image, mapped again
    assert [m.model_id for m in images.client.list_models(fingerprint=key)] == [image_id(key)]
    assert used(images.client) == memory  # no second copy in the daemon either
    assert in_slabs(second)
    assert same(run(second, encoder), want)
    assert tied(second) == tied(reference)
    assert type(second) is type(reference) and second.dtype == reference.dtype
    assert second.config.dtype == reference.config.dtype
    assert {n: t.dtype for n, t in second.state_dict().items()} == {
        n: t.dtype for n, t in reference.state_dict().items()
    }
    assert not second.training


class Recorded(CAUSAL):  # type: ignore[misc]
    """transformers' own loader, recording the tensors it gave."""

    loaded: ClassVar[list[weakref.ref[torch.Tensor]]] = []

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        module = super().from_pretrained(*args, **kwargs)
        cls.loaded = [weakref.ref(t) for t in module.state_dict(keep_vars=True).values()]
        return module


def test_the_first_start_keeps_no_copy_of_its_own(images: Images) -> None:
    path = save(images.daemon.root / "recorded", configs()["llama"])
    module = images.load(path, model_class=Recorded)
    assert Recorded.loaded
    gc.collect()
    assert [r for r in Recorded.loaded if r() is not None] == []  # transformers' tensors freed
    assert in_slabs(module)


def test_the_weights_sleep_and_wake_between_forward_passes(images: Images) -> None:
    path = save(images.daemon.root / "sleepy", configs()["qwen2"])
    want = output(CAUSAL.from_pretrained(path).eval(), False)
    module = images.load(path)
    model = module.torpor_model
    for level in (1, 1, 2):  # (level 2: through the disk cache, an image having no source)
        images.client.sleep_model(model.model_id, level=level)
        assert not model.ready()
        images.client.wake_model(model.model_id, verify=True)
        assert same(run(module, False), want)
    # A forward pass started while asleep waits for each layer, and is answered after wake.
    images.client.sleep_model(model.model_id, level=1)
    got: list[torch.Tensor] = []
    waiting = threading.Thread(target=lambda: got.append(run(module, False)))
    waiting.start()
    images.client.wake_model(model.model_id)
    waiting.join(60)
    assert len(got) == 1 and same(got[0], want)
    # A start that finds the image asleep wakes it.
    images.client.sleep_model(model.model_id, level=1)
    again = images.load(path)
    assert again.torpor_model.model_id == model.model_id
    state = images.client.get_model(model.model_id).state
    assert state == common_pb2.MODEL_STATE_ACTIVE
    assert same(run(again, False), want)


def test_two_dtypes_are_two_images(images: Images) -> None:
    path = save(images.daemon.root / "dtypes", configs()["mistral"])
    bf16 = images.load(path)
    fp32 = images.load(path, dtype=torch.float32)
    assert bf16.torpor_model.model_id != fp32.torpor_model.model_id
    assert (bf16.dtype, fp32.dtype) == (torch.bfloat16, torch.float32)
    assert same(run(fp32, False), output(CAUSAL.from_pretrained(path, dtype=torch.float32), False))
    assert same(run(bf16, False), output(CAUSAL.from_pretrained(path), False))
    again = images.load(path, dtype="float32")  # (its name: the same image)
    assert again.torpor_model.model_id == fp32.torpor_model.model_id


def test_a_config_that_ties_two_tensors_of_the_checkpoint_leaves_them_two(
    images: Images,
) -> None:
    """The config says tied, the checkpoint holds a head that is not the
    embedding: from_pretrained uses both, and so do both starts."""
    import json

    config = transformers.LlamaConfig(**SMALL, **ATTENTION, tie_word_embeddings=False)
    path = save(images.daemon.root / "two-tensors", config)
    written = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**written, "tie_word_embeddings": True}))
    reference = CAUSAL.from_pretrained(path).eval()
    assert not tied(reference)
    for module in (images.load(path), images.load(path)):
        assert not tied(module)
        assert same(run(module, False), output(reference, False))


class Rivalled(CAUSAL):  # type: ignore[misc]
    """transformers' own loader, while another engine publishes the same
    image first."""

    rival: AttachedModel | None = None
    client: Client

    @classmethod
    def from_pretrained(cls, path: Path, **kwargs: Any) -> Any:
        module = super().from_pretrained(path, **kwargs)
        if cls.rival is None:
            key = fingerprint(path, model_class=cls)
            tensors = dict(module.named_parameters())
            cls.rival = publish("rival", key, groups_of(tensors), client=cls.client)
        return module


def test_a_start_beaten_to_publishing_takes_the_other_image(images: Images) -> None:
    path = save(images.daemon.root / "rivalled", configs()["llama"])
    Rivalled.client = images.client
    module = images.load(path, model_class=Rivalled)
    assert Rivalled.rival is not None
    images.attached.append(Rivalled.rival)
    assert module.torpor_model.model_id == "rival"
    assert same(run(module, False), output(CAUSAL.from_pretrained(path).eval(), False))


def half_published(images: Images, path: Path, model_id: str) -> tuple[AttachedModel, str]:
    """Another engine publishing the image of `path`: written, not committed."""
    key = fingerprint(path, model_class=CAUSAL)
    reference = CAUSAL.from_pretrained(path).eval()
    tensors = dict(reference.named_parameters())
    request = publish_request(key, groups_of(tensors))
    publisher = AttachedModel(model_id, client=images.client, publish=request)
    views = publisher.state_dict()
    with torch.no_grad():
        for name, tensor in tensors.items():
            views[name].copy_(tensor)
    return publisher, key


def test_a_start_waits_for_the_image_another_engine_is_publishing(images: Images) -> None:
    path = save(images.daemon.root / "awaited", configs()["phi3"])
    publisher, _ = half_published(images, path, "awaited")
    images.attached.append(publisher)
    got: list[Any] = []
    failed: list[BaseException] = []

    def start() -> None:
        try:
            got.append(images.load(path))
        except BaseException as err:
            failed.append(err)

    waiting = threading.Thread(target=start)
    waiting.start()
    waiting.join(1)
    assert waiting.is_alive() and not got and not failed  # not before the commit
    publisher.commit()
    waiting.join(60)
    assert not failed, failed
    assert got[0].torpor_model.model_id == "awaited"
    assert same(run(got[0], False), output(CAUSAL.from_pretrained(path).eval(), False))


def test_an_image_that_stays_unpublished_is_a_clear_timeout(images: Images) -> None:
    path = save(images.daemon.root / "stuck", configs()["gpt2"])
    publisher, key = half_published(images, path, "stuck")
    try:
        with pytest.raises(TorporError) as err:
            images.load(path, wait_timeout=0.5)
        assert (err.value.code, err.value.reason) == (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "IMAGE_NOT_READY",
        )
        assert err.value.metadata == {"model_id": "stuck", "state": "PUBLISHING"}
    finally:
        publisher.close()
    assert images.client.list_models(fingerprint=key) == []  # nothing left behind


def test_options_transformers_takes_are_config_overrides(images: Images) -> None:
    path = save(images.daemon.root / "options", configs()["llama"])
    eager = images.load(path, attn_implementation="eager", rms_norm_eps=1e-3)
    want = CAUSAL.from_pretrained(path, attn_implementation="eager", rms_norm_eps=1e-3)
    assert eager.config.rms_norm_eps == 1e-3 and eager.config._attn_implementation == "eager"
    assert same(run(eager, False), output(want.eval(), False))
    again = images.load(path, rms_norm_eps=1e-3, attn_implementation="eager")
    assert again.torpor_model.model_id == eager.torpor_model.model_id
    for option in ("no_such_option", "subfolder", "device_map", "torch_dtype"):
        with pytest.raises(ValueError, match=rf"{option}: neither a field of LlamaConfig"):
            images.load(path, **{option: "x"})
    with pytest.raises(ValueError, match=r"options must be JSON values"):
        images.load(path, rms_norm_eps=object())


def test_a_quantized_checkpoint_is_refused(images: Images) -> None:
    import json

    path = save(images.daemon.root / "quantized", configs()["llama"])
    written = json.loads((path / "config.json").read_text())
    quantized = {**written, "quantization_config": {"quant_method": "fp8"}}
    (path / "config.json").write_text(json.dumps(quantized))
    with pytest.raises(ValueError, match=r"is a quantized checkpoint"):
        images.load(path)
    assert images.client.list_models(fingerprint=fingerprint(path, model_class=CAUSAL)) == []
