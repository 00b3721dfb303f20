"""The install lines of README.md and systemd/README.md work as written.

Read as a newcomer follows them, in order: every `pip install` names extras
that pyproject.toml has (from the checkout: the package is not published)
or packages pyproject pins, and every command the docs run (`python -m ...`,
a console script, an engine's imports) needs no third-party module beyond
what the extras installed so far provide. Checked statically (no venv is
made, nothing is installed): a module's imports, followed through our own
packages, against the distributions the extras pull in, as this venv's
metadata resolves them; and each documented module imports here.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import shlex
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
SOURCES = {"torpor": ROOT / "agent", "torpord": ROOT / "daemon", "tests": ROOT}
# Imported only on a path the docs' CPU sequences don't take: the CUDA
# modules (a GPU host's cuda12/cuda13 extra brings them) and
# torpor.agent.modules.from_transformers (the engine's own transformers), and
# vLLM: the README installs it first (scripts/vllm-env's .venv-vllm here), and
# tests.bench.bench_vllm imports it only in the engines it runs with that
# environment's python.
GPU_OR_ENGINE_OWN = {"cuda", "cupy", "transformers", "vllm"}
DOCS = ("README.md", "systemd/README.md")


@dataclass
class Step:
    """One thing the doc has the reader do, where it says so."""

    line: int
    text: str
    extras: list[str] = field(default_factory=list)  # a pip install from the checkout
    packages: list[str] = field(default_factory=list)  # a pip install by name
    modules: list[str] = field(default_factory=list)  # what a command runs or imports


def commands(text: str) -> Iterator[list[str]]:
    """The simple commands of a shell line, as words (no comments)."""
    try:
        lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|()")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
    except ValueError:  # (a line that continues a quoted string)
        return
    words: list[str] = []
    for token in [*tokens, ";"]:
        if token and set(token) <= set(";&|()"):
            while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
                words.pop(0)  # an environment assignment
            if words:
                yield words
            words = []
        else:
            words.append(token)


def pip_install(words: list[str], step: Step) -> None:
    args = iter(words[words.index("install") + 1 :])
    for arg in args:
        if arg in ("-e", "--editable"):
            continue
        if arg in ("--index-url", "--extra-index-url", "-i", "-c", "-r"):
            next(args, None)
            continue
        if arg.startswith("-"):
            continue
        match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", arg)
        if match:
            step.extras += (match.group(1) or "").split(",") if match.group(1) else []
        else:
            step.packages.append(arg)


def step_of(line: int, text: str, shell: bool) -> Step:
    step = Step(line, text)
    for words in commands(text):
        program = words[0].rsplit("/", 1)[-1]
        if program == "pip" and "install" in words:
            pip_install(words, step)
        elif program in ("python", "python3") and words[1:2] == ["-m"] and len(words) > 2:
            if words[2] == "pip" and "install" in words:
                pip_install(words, step)
            elif words[2] != "venv":
                step.modules.append(words[2])
        elif shell and program in SCRIPTS:
            step.modules.append(SCRIPTS[program].split(":")[0])
    return step


def steps(doc: str) -> list[Step]:
    """Fenced shell and Python blocks, and inline `pip install` and `python -m`
    spans, in the order the doc has them."""
    out: list[Step] = []
    fence: str | None = None
    for number, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if fence in ("sh", "bash"):
            out.append(step_of(number, line, shell=True))
        elif fence == "python":
            match = re.match(r"\s*(?:from\s+([\w.]+)\s+import|import\s+([\w.]+))", line)
            if match:
                out.append(Step(number, line, modules=[match.group(1) or match.group(2)]))
        elif fence is None:
            for span in re.findall(r"`([^`]+)`", line):
                if span.startswith(("pip install", "python -m")):
                    out.append(step_of(number, span, shell=False))
    return [s for s in out if s.extras or s.packages or s.modules]


def source_of(module: str) -> Path | None:
    base = SOURCES.get(module.split(".")[0])
    if base is None:
        return None
    path = base.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Under `if TYPE_CHECKING:` or in a `try` that handles ImportError."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if (
            isinstance(parent, ast.If)
            and "TYPE_CHECKING" in ast.unparse(parent.test)
            and child in parent.body
        ):
            return True
        if isinstance(parent, ast.Try) and child in parent.body:
            caught = " ".join(ast.unparse(h.type) for h in parent.handlers if h.type)
            if "ImportError" in caught or "ModuleNotFoundError" in caught:
                return True
        child, parent = parent, parents.get(parent)
    return False


def imports_of(module: str) -> set[str]:
    """Every module `module`'s source imports (at any depth, unguarded)."""
    path = source_of(module)
    assert path is not None, module
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and not guarded(node, parents):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not guarded(node, parents):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@cache
def third_party(module: str) -> dict[str, str]:
    """The third-party top-level names `module` needs: name → our module
    that imports it. Follows our own modules (and their packages)."""
    needed: dict[str, str] = {}
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        parts = current.split(".")
        for i in range(1, len(parts) + 1):  # a module's packages are imported first
            name = ".".join(parts[:i])
            if name in seen or source_of(name) is None:
                continue
            seen.add(name)
            for imported in imports_of(name):
                top = imported.split(".")[0]
                if top in SOURCES:
                    todo.append(imported)
                elif top and top not in sys.stdlib_module_names:
                    needed.setdefault(top, name)
    return needed


def requirements(extras: list[str]) -> set[str]:
    """The distributions `pip install -e '.[extras]'` brings, as this venv's
    metadata resolves them (base dependencies, extras, their dependencies)."""
    todo = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    for extra in extras:
        todo += [Requirement(r) for r in EXTRAS[extra]]
    names: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name == "torpor":
            todo += [Requirement(r) for extra in req.extras for r in EXTRAS[extra]]
            continue
        if name in names:
            continue
        names.add(name)
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not in this venv (a GPU host's package): nothing to follow
        for text in requires:
            dep = Requirement(text)
            wanted = ["", *sorted(req.extras)]
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in wanted):
                todo.append(dep)
    return names


@cache
def provided(extras: tuple[str, ...]) -> frozenset[str]:
    """The top-level import names those distributions provide here."""
    dists = requirements(list(extras))
    return frozenset(
        top
        for top, owners in importlib.metadata.packages_distributions().items()
        if any(canonicalize_name(owner) in dists for owner in owners)
    )


def all_pinned() -> set[str]:
    reqs = PYPROJECT["project"]["dependencies"] + [r for rs in EXTRAS.values() for r in rs]
    return {canonicalize_name(Requirement(r).name) for r in reqs}


def test_the_docs_are_read_as_expected() -> None:
    """The parser finds the sequences this test is about (so it can't pass
    by finding nothing)."""
    readme = steps("README.md")
    assert [e for s in readme for e in s.extras][:4] == ["daemon", "agent", "vllm", "examples"]
    modules = {m for s in readme for m in s.modules}
    assert {"torpord.main", "torpor.testing", "torpor.cli.main"} <= modules
    assert {"torpor.examples.tinylm", "torpor.examples.engine", "torpor.agent"} <= modules
    assert [e for s in steps("systemd/README.md") for e in s.extras] == ["cuda12"]


@pytest.mark.parametrize("doc", DOCS)
def test_every_pip_install_names_what_the_checkout_has(doc: str) -> None:
    for step in steps(doc):
        for extra in step.extras:
            assert extra in EXTRAS, f"{doc}:{step.line}: no extra {extra!r} in pyproject.toml"
        for package in step.packages:
            name = canonicalize_name(Requirement(package).name)
            where = f"{doc}:{step.line}: {package!r}"
            assert name != "torpor", f"{where}: not published; install from the checkout"
            assert name in all_pinned(), f"{where}: not a requirement in pyproject.toml"


@pytest.mark.parametrize("doc", DOCS)
def test_each_documented_command_runs_on_the_extras_installed_before_it(doc: str) -> None:
    installed: list[str] = []
    missing = []
    for step in steps(doc):
        installed += step.extras
        for module in step.modules:
            have = provided(tuple(installed))
            for name, by in third_party(module).items():
                if name not in have and name not in GPU_OR_ENGINE_OWN:
                    missing.append(
                        f"{doc}:{step.line}: {module} needs {name!r} (imported by {by});"
                        f" installed so far: {installed or 'nothing'}"
                    )
    assert not missing, "\n".join(missing)


def test_the_service_runs_what_the_systemd_install_provides() -> None:
    unit = (ROOT / "systemd" / "torpord.service").read_text()
    program = re.search(r"^ExecStart=(\S+)", unit, re.M)
    assert program is not None
    module = SCRIPTS[program.group(1).rsplit("/", 1)[-1]].split(":")[0]
    extras = [e for s in steps("systemd/README.md") for e in s.extras]
    have = provided(tuple(extras))
    assert not {n for n in third_party(module) if n not in have} - GPU_OR_ENGINE_OWN


def test_the_checker_sees_a_missing_extra() -> None:
    """The README's example engine needs torch and safetensors: the daemon's
    extra alone does not provide them, and the check says so."""
    have = provided(("daemon",))
    assert {"torch", "safetensors"} <= set(third_party("torpor.examples.tinylm")) - have
    assert {"torch", "safetensors"} <= provided(("examples",))


@pytest.mark.parametrize("doc", DOCS)
def test_each_documented_module_imports_here(doc: str) -> None:
    for module in {m for s in steps(doc) for m in s.modules}:
        if module.split(".")[0] in ("torpor", "torpord"):
            importlib.import_module(module)
