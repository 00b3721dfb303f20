"""An engine on an emulated GPU that publishes an image, attaches to one, or
misbehaves with one, answering commands on stdin with JSON lines:

    python tests/emulator/imager.py SOCKET MODEL MODE [ARGS]

Modes (each prints {"ready": ...} first):
  publish FP SEED   publish weights(SEED) as MODEL with fingerprint FP
                    (torpor.agent.publish: writable CUDA slabs, copied into,
                    committed, then mapped again read-only at the same
                    addresses); ready says the given weights' digest and
                    the layers' addresses as they were written
  attach            attach to MODEL
  unfinished FP SEED  begin publishing, write every tensor, never commit
  tamper LAYER      attach to MODEL, then take LAYER's slab from the fd
                    socket as any attached engine can, map it READWRITE at
                    an address of its own, flip its first byte and unmap it

Commands: "read" (the digest of every tensor and the layers' addresses, once
every layer is mapped), "write" (try to change the first byte of the first
layer through the driver, as a kernel would: the driver's answer), "quit".

Imports tests/emulator/engine.py: tensors are CPU views of the device
addresses (CUDAEMU_HOST_ACCESS), the agent's CUDA side is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import engine  # noqa: F401  (CPU views of device memory)
import torch
from torpor import Client
from torpor.agent import attach, request_fds
from torpor.agent.attach import AttachedModel
from torpor.agent.cuda import CudaSlabRange
from torpor.agent.publish import groups_of, publish, publish_request


def weights(seed: int) -> dict[str, torch.Tensor]:
    """What an engine computed: names and dtypes no checkpoint has, a layer
    bigger than the driver's 2 MiB granularity."""
    g = torch.Generator().manual_seed(seed)
    out = {"embed.weight": torch.randn(256, 64, generator=g)}
    for i in range(2):
        out[f"model.layers.{i}.qkv_proj.weight"] = torch.randn(192, 64, generator=g).to(
            torch.bfloat16
        )
        out[f"model.layers.{i}.scale"] = torch.tensor([i + 3], dtype=torch.int32)
    out["model.layers.1.gate_up.weight"] = torch.randn(1024, 640, generator=g)  # 2.5 MiB
    out["lm_head.weight"] = torch.randn(256, 64, generator=g)
    return out


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def say(value: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def write_through_driver(address: int, device: int) -> str:
    """A copy into device memory at `address` (the driver's answer): on a
    read-only mapping, a fault (as a kernel's store would be)."""
    from cuda.bindings import driver as d

    context = d.cuDevicePrimaryCtxRetain(d.cuDeviceGet(device)[1])[1]
    d.cuCtxSetCurrent(context)
    err = d.cuMemcpyHtoD(address, b"\xff", 1)[0]
    if err == d.CUresult.CUDA_SUCCESS:
        err = d.cuCtxSynchronize()[0]
    return str(d.cuGetErrorName(err)[1].decode())


def tamper(model: AttachedModel, layer: str) -> None:
    header, fds = request_fds(
        model.fd_socket, model.attachment_id, [layer], model_id=model.model_id, timeout=60
    )
    try:
        (fd,) = fds
        (sent,) = header["layers"]
        mine = CudaSlabRange(int(sent["size"]), model.device_index)
        mine.map(fd, writable=True)
    finally:
        for fd in fds:
            os.close(fd)
    view = mine.tensor(0, "U8", [1])
    view[0] = int(view[0]) ^ 0xFF
    mine.release()


def main() -> None:
    socket, model_id, mode, *args = sys.argv[1:]
    torch.set_num_threads(1)
    client = Client(socket=socket)
    model: AttachedModel
    if mode == "publish":
        given = weights(int(args[1]))
        written_at: dict[str, tuple[int, int]] = {}
        commit = AttachedModel.commit

        def noting_commit(self: AttachedModel) -> None:  # (where publish() wrote)
            written_at.update(self.ranges())
            commit(self)

        AttachedModel.commit = noting_commit  # type: ignore[method-assign]
        model = publish(model_id, args[0], groups_of(given), client=client, engine="imager")
        say({"ready": True, "given": digest(given), "written_at": written_at})
    elif mode == "unfinished":
        given = weights(int(args[1]))
        request = publish_request(args[0], groups_of(given))
        model = AttachedModel(model_id, client=client, publish=request)
        views = model.state_dict()
        for name, tensor in given.items():
            views[name].copy_(tensor)
        say({"ready": True, "given": digest(given)})
    elif mode == "attach":
        model = attach(model_id, client=client, engine="imager")
        say({"ready": True})
    elif mode == "tamper":
        model = attach(model_id, client=client, engine="tamper")
        tamper(model, args[0])
        say({"ready": True})
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    for line in sys.stdin:
        command = line.strip()
        if command == "read":
            with model.use(timeout=60):
                say({"digest": digest(model.state_dict()), "ranges": model.ranges()})
        elif command == "write":
            with model.use(timeout=60):
                address = model.ranges()[model.layers[0]][0]
                say({"write": write_through_driver(address, model.device_index)})
            os._exit(0)  # (a fault is sticky: this process's context is done)
        elif command == "quit":
            break
    model.close()


if __name__ == "__main__":
    main()
