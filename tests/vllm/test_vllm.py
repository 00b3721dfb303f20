"""vLLM with `load_format="torpor"` under a real torpord: the same tokens as
`load_format="safetensors"`, a second start that reads no checkpoint byte,
one image however many engines map it, nothing left by an engine killed
while publishing, and requests answered the same through sleep and wake."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from torpor import Client
from torpor.v1 import common_pb2

from ..e2e.conftest import Daemon, with_disk_cache
from ..e2e.observe import settle, used
from .conftest import Engine, require_vllm

require_vllm()

# Each test starts one to three vLLM engines in turn (about 50 s here at
# most): the suite's default of 120 s is too near on a slower machine.
pytestmark = pytest.mark.timeout(400)

MODELS = ("llama", "qwen2", "mixtral")


def start(engines: list[Engine], daemon: Daemon, tmp_path: Path, *runs: str, **kw: Any) -> Engine:
    engine = Engine(daemon, list(runs), tmp_path / f"engine-{len(engines)}.log", **kw)
    engines.append(engine)
    return engine


def scribble_weights(directory: Path) -> None:
    """Overwrite every tensor byte of the checkpoint (the header stays, which
    vLLM's config step reads for tied models) with 0xFF (NaN in bf16),
    keeping the file's inode, size and mtime: the fingerprint is the same,
    and any engine that read the weights would answer differently."""
    for path in directory.glob("*.safetensors"):
        st = path.stat()
        with open(path, "r+b") as f:
            header = 8 + int.from_bytes(f.read(8), "little")
            f.seek(header)
            f.write(b"\xff" * (st.st_size - header))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_torpor_answers_as_safetensors_and_a_hit_reads_no_weights(
    models: Path, daemon: Daemon, client: Client, engines: list[Engine], tmp_path: Path
) -> None:
    runs = [f"{models / m}={fmt}" for m in MODELS for fmt in ("safetensors", "torpor")]
    first = start(engines, daemon, tmp_path, *runs)
    got = first.results(len(runs))
    assert first.wait() == 0
    reference = {}
    for name, (plain, miss) in zip(MODELS, zip(got[::2], got[1::2], strict=True), strict=True):
        assert miss["tokens"] == plain["tokens"], name  # token for token
        assert miss["params"] == miss["params_in_image"] > 0, name  # zero-copy
        reference[name] = plain["tokens"]
    images = client.list_models()
    assert len(images) == len(MODELS)
    for image in images:
        assert image.state == common_pb2.MODEL_STATE_ACTIVE
        assert image.fingerprint.startswith("vllm-0.32") and image.source.path == ""
        assert image.last_transition.kind == common_pb2.TRANSITION_KIND_PUBLISH
    published = {m.model_id: m.last_transition.start_time.ToNanoseconds() for m in images}

    for name in MODELS:
        scribble_weights(models / name)
    runs = [f"{models / m}=torpor" for m in MODELS] + [f"{models / 'llama'}=safetensors"]
    second = start(engines, daemon, tmp_path, *runs)
    got = second.results(len(runs))
    assert second.wait() == 0
    for name, hit in zip(MODELS, got, strict=False):
        assert hit["tokens"] == reference[name], name
        assert hit["params"] == hit["params_in_image"] > 0, name
    # The checkpoint really is garbage now: reading it answers otherwise.
    assert got[-1]["tokens"] != reference["llama"]
    # The hits published nothing and loaded nothing: the same images, no other model.
    after = client.list_models()
    assert {m.model_id: m.last_transition.start_time.ToNanoseconds() for m in after} == published
    assert all(m.source.path == "" for m in after)


def test_two_engines_map_one_image_counted_once(
    models: Path, daemon: Daemon, client: Client, engines: list[Engine], tmp_path: Path
) -> None:
    before = used(client)
    one = start(engines, daemon, tmp_path, f"{models / 'llama'}=torpor", serve=True)
    answer = one.result()["tokens"]
    (image,) = client.list_models()
    with_one = used(client)
    assert with_one[0] > before[0]
    # vLLM's default layout (engine core and worker processes): the plugin
    # is found through its entry point in the worker, which maps the image.
    two = start(
        engines,
        daemon,
        tmp_path,
        f"{models / 'llama'}=torpor",
        serve=True,
        single_process=False,
    )
    assert two.result()["tokens"] == answer
    assert client.get_model(image.model_id).engines == 2
    assert used(client) == with_one
    assert [m.model_id for m in client.list_models()] == [image.model_id]
    for engine in (one, two):
        engine.send("generate")
        assert engine.result()["tokens"] == answer
    assert one.quit() == 0 and two.quit() == 0
    assert settle(lambda: client.get_model(image.model_id).engines == 0)
    assert used(client) == with_one  # the image stays for the next start


def test_an_engine_killed_while_publishing_leaves_nothing(
    models: Path, daemon: Daemon, client: Client, engines: list[Engine], tmp_path: Path
) -> None:
    before = used(client)
    engine = start(engines, daemon, tmp_path, f"{models / 'qwen2'}=torpor", pause_publish=True)
    model_id = engine.line("PUBLISHING ")
    # The slabs are allocated and written; nothing is committed yet.
    assert client.get_model(model_id).state == common_pb2.MODEL_STATE_PUBLISHING
    assert used(client)[0] > before[0]
    engine.proc.send_signal(signal.SIGKILL)
    assert engine.wait() == -signal.SIGKILL
    assert settle(lambda: not client.list_models())
    assert settle(lambda: used(client) == before)


def test_requests_wait_through_sleep_and_wake(
    models: Path, daemon: Daemon, client: Client, engines: list[Engine], tmp_path: Path
) -> None:
    llama = models / "llama"
    engine = start(engines, daemon, tmp_path, f"{llama}=safetensors", f"{llama}=torpor", serve=True)
    reference, mine = engine.results(2)
    assert mine["tokens"] == reference["tokens"]
    (image,) = client.list_models()
    for cycle in range(20):
        level = 1 if cycle < 10 else 2
        if cycle % 2:
            engine.send("generate")  # in flight as the sleep is asked for
        client.sleep_model(image.model_id, level=level)
        asleep = client.get_model(image.model_id)
        assert (asleep.state, asleep.sleep_level) == (common_pb2.MODEL_STATE_ASLEEP, level)
        if not cycle % 2:
            engine.send("generate")  # arrives while the weights are away: waits
        client.wake_model(image.model_id, verify=level == 2)
        assert engine.result()["tokens"] == reference["tokens"], (cycle, level)
    # An engine that starts while the image sleeps wakes it and maps it.
    client.sleep_model(image.model_id, level=2)
    assert engine.quit() == 0
    later = start(engines, daemon, tmp_path, f"{llama}=torpor")
    assert later.result()["tokens"] == reference["tokens"]
    assert later.wait() == 0
    woken = client.get_model(image.model_id)
    assert woken.state == common_pb2.MODEL_STATE_ACTIVE
    assert woken.last_transition.kind == common_pb2.TRANSITION_KIND_WAKE


def test_an_engine_waits_for_another_publishing_its_image(
    models: Path, daemon: Daemon, client: Client, engines: list[Engine], tmp_path: Path
) -> None:
    model = f"{models / 'mixtral'}=torpor"
    first = start(engines, daemon, tmp_path, model, pause_publish=True, serve=True)
    model_id = first.line("PUBLISHING ")
    second = start(engines, daemon, tmp_path, model, serve=True)
    waiting = f"torpor: waiting for image {model_id} (MODEL_STATE_PUBLISHING)"
    assert settle(lambda: waiting in second.log.read_text(errors="replace"), timeout=90)
    first.send("")  # the commit goes on
    answer = first.result()["tokens"]
    assert second.result()["tokens"] == answer
    assert [m.model_id for m in client.list_models()] == [model_id]
    assert client.get_model(model_id).engines == 2
    assert first.quit() == 0 and second.quit() == 0


def test_an_engine_serves_on_across_a_daemon_restart(
    models: Path, daemon: Daemon, client: Client, engines: list[Engine], tmp_path: Path
) -> None:
    engine = start(engines, daemon, tmp_path, f"{models / 'llama'}=torpor", serve=True)
    answer = engine.result()["tokens"]
    (image,) = client.list_models()
    client.sleep_model(image.model_id, level=2)  # (a disk copy: the image outlives torpord)
    client.wake_model(image.model_id)
    assert daemon.stop() == 0
    engine.send("generate")  # arrives while torpord is away: waits for the image
    again = with_disk_cache(tmp_path)
    try:
        again.wait_ready()
        assert engine.result()["tokens"] == answer
        with Client(socket=str(again.socket)) as after:
            back = after.get_model(image.model_id)
            assert back.state == common_pb2.MODEL_STATE_ACTIVE and back.engines == 1
        assert engine.quit() == 0
    finally:
        again.kill()


def test_a_wrong_option_or_no_daemon_is_a_clear_start_failure(
    models: Path, daemon: Daemon, client: Client, engines: list[Engine], tmp_path: Path
) -> None:
    llama = f"{models / 'llama'}=torpor"
    typo = start(engines, daemon, tmp_path, llama, extra='{"sokcet": "/x"}')
    nowhere = start(engines, daemon, tmp_path, llama, extra=f'{{"socket": "{tmp_path}/no.sock"}}')
    assert typo.wait() != 0 and nowhere.wait() != 0
    assert "unknown model_loader_extra_config key(s) ['sokcet']" in typo.log.read_text()
    assert f"cannot reach torpord on socket {tmp_path}/no.sock" in nowhere.log.read_text()
    assert client.list_models() == []
