"""torpord-sim end to end: a real process, real files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--models", "12", "--days", "0.05", "--seed", "3"]


def sim(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'agent'}:{ROOT / 'daemon'}")
    return subprocess.run(
        [sys.executable, "-m", "torpord.sim", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )


def test_generate_then_run_writes_the_table_and_the_plot(tmp_path: Path) -> None:
    made = sim("generate", *SMALL, "--out", tmp_path / "t", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    trace, spec = tmp_path / "t" / "trace.csv", tmp_path / "t" / "spec.json"
    assert trace.read_text().startswith("arrival_seconds,model_id,duration_seconds\n")
    table, png = tmp_path / "table.md", tmp_path / "plot.png"
    ran = sim(
        "run", "--trace", trace, "--spec", spec, "--table", table, "--plot", png, cwd=tmp_path
    )
    assert ran.returncode == 0, ran.stderr
    rows = [line for line in table.read_text().splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == [
        "torpor",
        "torpor-layers",
        "keep-alive",
        "lru-sleep",
        "no-oversub",
    ]
    assert rows[-1].split("|")[2].strip() == "100.0%"  # no oversubscription: every request hits
    head = [cell.strip() for cell in rows[0].split("|")]
    refused = head.index("refused ≥1")
    assert rows[-1].split("|")[refused].strip() == "0 (0.0%)"
    assert rows[0] in ran.stdout
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_a_generated_run_takes_a_preset_and_chosen_policies(tmp_path: Path) -> None:
    ran = sim(
        "run",
        "--preset",
        "bursty",
        *SMALL,
        "--policies",
        "lru-sleep",
        "--acquire-patience",
        "0",
        "--retry-after",
        "2.5",
        cwd=tmp_path,
    )
    assert ran.returncode == 0, ran.stderr
    assert "generated (bursty, seed 3)" in ran.stdout
    assert "acquire patience 0 s, router retry after 2.5 s" in ran.stdout
    assert "| lru-sleep |" in ran.stdout and "| torpor |" not in ran.stdout


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    made = sim("generate", *SMALL, "--out", tmp_path, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    trace = tmp_path / "trace.csv"
    lines = trace.read_text().splitlines()
    lines[3] = "12.5,not-a-model,1"
    trace.write_text("\n".join(lines) + "\n")
    ran = sim("run", "--trace", trace, "--spec", tmp_path / "spec.json", cwd=tmp_path)
    assert ran.returncode == 2
    assert f"torpord-sim: error: {trace} line 4: expected model_id" in ran.stderr
    assert "not-a-model" not in ran.stderr
    ran = sim("run", "--trace", trace, cwd=tmp_path)
    assert ran.returncode == 2 and "--trace and --spec go together" in ran.stderr
    ran = sim("run", "--policies", "ollama", *SMALL, cwd=tmp_path)
    assert ran.returncode == 2 and "--policies" in ran.stderr
    ran = sim("run", "--retry-after", "0", *SMALL, cwd=tmp_path)
    assert ran.returncode == 2 and "router retry delay: expected > 0 seconds" in ran.stderr
    ran = sim("generate", "--amplitude", "1.5", "--out", tmp_path, cwd=tmp_path)
    assert ran.returncode == 2 and "amplitude" in ran.stderr
