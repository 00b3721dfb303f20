"""Regenerate the Python code for proto/torpor/v1 into agent/torpor/v1.

One pinned generator (grpcio-tools and mypy-protobuf, pinned in pyproject's
dev extra) so that the committed code is reproducible; tests/unit/test_genproto.py
regenerates into a temporary directory and fails on any difference.

    python scripts/genproto.py [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.resources
import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
DEFAULT_OUT = ROOT / "agent"


def _plugin(name: str) -> str:
    """mypy-protobuf's plugins, from the same environment as this interpreter."""
    beside = pathlib.Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: pip install -e '.[dev]'")
    return found


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    """Generate into out/torpor/v1 and return the files written."""
    protos = sorted(
        str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "torpor" / "v1").glob("*.proto")
    )
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_DIR}",
            f"-I{well_known}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        target = out / "torpor" / "v1"
        target.mkdir(parents=True, exist_ok=True)
        for old in target.glob("*_pb2*"):
            old.unlink()
        written = []
        for src in sorted((pathlib.Path(tmp) / "torpor" / "v1").iterdir()):
            dst = target / src.name
            shutil.copyfile(src, dst)
            written.append(dst)
        init = target / "__init__.py"
        if not init.exists():
            init.write_text(
                '"""Generated gRPC and protobuf code for torpor.v1 (scripts/genproto.py)."""\n'
            )
        return written


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out), file=sys.stderr)


if __name__ == "__main__":
    main()
