"""An emulated NVIDIA driver (libcuda.so.1 and libnvidia-ml.so.1, from cuda.c
and nvml.c here) so the CUDA backend and the agent's CUDA side run, through
the real `cuda-bindings` and `pynvml`, on a machine without a GPU. What it
emulates and how strictly: cuda.c's header.

`build(directory)` compiles both (gcc, with the CUDA toolkit's cuda.h for the
driver's exact types) and `environment(directory, ...)` is what a process
needs to load them instead of a real driver. They are loaded at a process's
first driver call, so tests run them in processes of their own.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = ("emulated.h", "cuda.c", "nvml.c", "used.c")


def active() -> bool:
    """Whether this process runs on the emulated driver (its environment says so)."""
    return "CUDAEMU_NODE" in os.environ


# Set (by .ci/run) where the emulator must run: then a missing compiler or
# cuda.h fails the tests that need it instead of skipping them.
REQUIRED = "TORPOR_REQUIRE_EMULATOR"


def toolkits() -> list[str]:
    """Where a CUDA toolkit may be installed."""
    candidates = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", "")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    return [*candidates, "/usr/local/cuda", *sorted(map(str, Path("/usr/local").glob("cuda-*")))]


def cuda_include(candidates: list[str] | None = None) -> Path | None:
    """The include directory with cuda.h, or None: a toolkit's (`candidates`,
    by default `toolkits()`), else the dev extra's `nvidia-cuda-runtime`
    wheel's (nvidia/cu13/include), so a machine without the toolkit has one."""
    for root in toolkits() if candidates is None else candidates:
        if root and (Path(root) / "include" / "cuda.h").is_file():
            return Path(root) / "include"
    try:
        import nvidia  # the namespace package of NVIDIA's wheels
    except ImportError:
        return None
    for root in nvidia.__path__:
        for include in sorted(Path(root).glob("cu*/include")):
            if (include / "cuda.h").is_file():
                return include
    return None


def unavailable() -> str | None:
    """Why the emulator can't be built or loaded here, or None."""
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        return "no C compiler"
    if cuda_include() is None:
        return "no cuda.h (the CUDA toolkit) to build the emulated driver against"
    try:
        import cuda.bindings.driver  # noqa: F401
    except ImportError as err:
        return f"cuda-bindings can't be imported ({err})"
    return None


def require() -> None:
    """For a test module that needs the emulator: skip it where the emulator
    can't be built, saying why, or fail it where it must run ($REQUIRED)."""
    import pytest

    why = unavailable()
    if why is None:
        return
    if os.environ.get(REQUIRED):
        pytest.fail(f"the emulated driver must run here (${REQUIRED}), but: {why}", pytrace=False)
    pytest.skip(why, allow_module_level=True)


def build(directory: Path) -> Path:
    """Compile the emulated libraries into `directory` (once per source
    version); the directory to put on LD_LIBRARY_PATH."""
    include = cuda_include()
    assert include is not None, unavailable()
    digest = hashlib.sha256(b"".join((HERE / s).read_bytes() for s in SOURCES)).hexdigest()[:16]
    out = directory / digest
    built = {
        "cuda.c": "libcuda.so.1",
        "nvml.c": "libnvidia-ml.so.1",
        "used.c": "libcudaemu-used.so",
    }
    if all((out / name).exists() for name in built.values()):
        return out
    out.mkdir(parents=True, exist_ok=True)
    cc = shutil.which("gcc") or "cc"
    flags = ["-O2", "-g", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-pthread"]
    for source, name in built.items():
        partial = out / f".{name}.tmp"
        done = subprocess.run(
            [
                cc,
                *flags,
                f"-I{include}",
                f"-Wl,-soname,{name}",
                "-o",
                str(partial),
                str(HERE / source),
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"building the emulated {name} failed:\n{done.stderr}")
        partial.rename(out / name)
    return out


def environment(
    libraries: Path,
    *,
    node: str,
    devices: int = 1,
    memory: int = 1 << 30,
    delay_us: int = 0,
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    """A process environment that loads the emulated driver: `devices` GPUs of
    `memory` bytes each, on an emulated node of its own name (processes with
    the same `node` see the same GPUs)."""
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(libraries), env.get("LD_LIBRARY_PATH", "")) if p
    )
    env.update(
        CUDAEMU_NODE=node,
        CUDAEMU_DEVICES=str(devices),
        CUDAEMU_MEMORY=str(memory),
        CUDAEMU_DELAY_US=str(delay_us),
    )
    return env


def used(libraries: Path, node: str, device: int = 0) -> int:
    """Bytes in use on an emulated GPU now, node-wide, as the emulated NVML
    and cuMemGetInfo report them."""
    import ctypes

    lib = ctypes.CDLL(str(libraries / "libcudaemu-used.so"))
    lib.cudaemu_used.restype = ctypes.c_ulonglong
    lib.cudaemu_used.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return int(lib.cudaemu_used(node.encode(), device))
