"""The committed generated code is exactly what scripts/genproto.py produces."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "genproto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = tmp_path / "torpor" / "v1"
    committed = ROOT / "agent" / "torpor" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if "_pb2" in p.name)
    assert names == sorted(p.name for p in committed.iterdir() if "_pb2" in p.name)
    match, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert not mismatch and not errors, (
        f"generated code is stale ({mismatch + errors}): run python scripts/genproto.py"
    )
    assert any(name.endswith(".pyi") for name in match)  # type stubs come with it
