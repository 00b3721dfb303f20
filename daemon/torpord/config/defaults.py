"""Defaults that depend on who runs the daemon (root or not) and on the storage layer."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from torpor.socketpath import standard_socket_path

from torpord.config.values import unique_paths


def default_socket() -> Path:
    # The client's rule too (torpor.socketpath): one copy, so the two cannot disagree.
    return Path(standard_socket_path(os.environ, os.geteuid()))


def default_allowed_roots() -> tuple[Path, ...]:
    if os.geteuid() == 0:
        return (Path("/var/lib/torpor/models"),)
    roots: list[Path] = []
    # No $HOME and no passwd entry (some containers): the temp dir alone then.
    with contextlib.suppress(RuntimeError):
        roots.append(Path.home())
    roots.append(Path(tempfile.gettempdir()))
    return unique_paths(root.resolve() for root in roots)


def default_layer_patterns() -> tuple[tuple[str, ...], tuple[str, ...]]:
    # Imported here rather than at the top so that loading a config never
    # drags in the storage package's own imports before they are needed.
    from torpord.storage.layers import DEFAULT_LAYER_PATTERNS

    return tuple(DEFAULT_LAYER_PATTERNS.blocks), tuple(DEFAULT_LAYER_PATTERNS.post)
