"""Structural rules the import contracts (pyproject, lint-imports) can't say."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (ROOT / "daemon" / "torpord", ROOT / "agent" / "torpor")


def sources() -> list[Path]:
    return [
        path
        for package in PACKAGES
        for path in sorted(package.rglob("*.py"))
        if not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
    ]


def test_no_module_imports_another_modules_private_names() -> None:
    """A leading underscore means "this module's own": no other module of
    ours reaches for it (a private *module* of a package, such as
    torpor.agent._gate, is its package's, and may be imported within it)."""
    found = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            if node.module.split(".")[0] not in ("torpor", "torpord"):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    where = path.relative_to(ROOT)
                    found.append(f"{where}:{node.lineno}: {node.module}.{alias.name}")
    assert not found, "\n".join(found)


def test_private_modules_are_imported_only_within_their_package() -> None:
    found = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            parts = node.module.split(".")
            private = [i for i, part in enumerate(parts) if part.startswith("_")]
            if parts[0] not in ("torpor", "torpord") or not private:
                continue
            owner = ".".join(parts[: private[0]])
            here = str(path.relative_to(ROOT / ("agent" if "agent" in path.parts else "daemon")))
            here_module = here.removesuffix(".py").replace("/", ".")
            if not here_module.startswith(owner + "."):
                found.append(f"{here}:{node.lineno}: {node.module} (private to {owner})")
    assert not found, "\n".join(found)


MAX_LINES = 400


def test_every_module_stays_small() -> None:
    """A module past a few hundred lines holds two things (STYLE.md): split it
    along its seam. Generated code (torpor.v1's *_pb2) is exempt."""
    big = {
        str(path.relative_to(ROOT)): lines
        for path in sources()
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"over {MAX_LINES} lines: {big}"
