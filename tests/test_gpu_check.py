"""``benchmarks/gpu_check.sh`` dry-run on the CPU (``SMOKE=1``), so that it cannot rot.

The dry run runs the checklist's commands at tiny sizes (fused in Triton's interpreter)
and must produce what a GPU run brings back: at most 8 files (the device returns no
more), a summary with every step and its time, and a benchmark CSV with a row for every
implementation, the peers that cannot run included as ``skip`` rows. Its step times are
in the summary (``pytest -s`` prints it): they tell what the GPU run's budgets must cover
besides the work itself. Nothing here asserts a time.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from palmtree.bench import peers
from palmtree.bench.compiled import COMPILED

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = [
    "setup",
    "verify",
    "gpu-tests",
    "bench-64",
    "bench-64-reference",
    "bench-128",
    "bench-128-reference",
    "bench-compile",
    "bench-192",
    "bench-256",
]

pytestmark = pytest.mark.slow
OPEN_CLIP = peers.peer_status("open_clip", "cpu")  # None when it can run here


def _run(out: Path, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, SMOKE="1", OUT=str(out), PY=sys.executable, WHEELS=str(out / "none"))
    full.update(env)
    return subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=full, timeout=900
    )


def _steps(summary: str) -> dict[str, list[str]]:
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells and cells[0] in STEPS:
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    return _run(out), out


def test_every_step_runs_and_passes(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    print(summary)
    steps = _steps(summary)
    assert list(steps) == STEPS
    for name, (budget, took, result) in steps.items():
        assert result.startswith("ok"), (name, result)
        assert 0 <= int(took) <= int(budget)
    assert "rows passed" in steps["verify"][2]


def test_at_most_eight_files_come_back(dry_run):
    _, out = dry_run
    files = sorted(p.name for p in out.iterdir())
    (csv_file,) = [f for f in files if f.endswith(".csv")]
    stem = csv_file.removesuffix(".csv")
    assert files == sorted(["log.txt", "summary.md", csv_file, f"{stem}.md", f"{stem}.png"])
    assert len(files) <= 8
    assert "== bench-256" in (out / "log.txt").read_text()


def test_the_benchmark_has_a_row_for_every_implementation_and_size(dry_run):
    _, out = dry_run
    (path,) = out.glob("*.csv")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    cases = {(r["impl"], int(r["batch"])): r["status"] for r in rows}
    for b in (64, 128):
        for impl in ("fused", "chunked", "reference", "open_clip", "inf_cl"):
            assert (impl, b) in cases
    assert {impl for impl, b in cases if b == 192} == {"fused", "chunked", "open_clip", "inf_cl"}
    assert {(r["impl"], r["precision"]) for r in rows if int(r["batch"]) == 256} == {
        ("fused", "bf16")
    }
    assert cases["inf_cl", 64] == "skip"  # CUDA only: a reported row, not a crash
    for impl in ("fused", "chunked", "reference"):
        assert cases[impl, 128] == "ok"
    md = path.with_suffix(".md").read_text()
    assert all(f"| {b} |" in md for b in (64, 128, 192, 256))  # every run, not the last


def test_the_compiled_chunked_loss_is_measured_beside_its_baselines(dry_run):
    """chunked+compile in bf16 (in the dry run at the first size only: one compilation),
    its compile time and its ratios to chunked and open_clip in the summary."""
    _, out = dry_run
    (path,) = out.glob("*.csv")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["precision"], r["batch"]) for r in rows if r["impl"] == COMPILED} == {("bf16", "64")}
    bf16 = {r["impl"]: r["status"] for r in rows if r["precision"] == "bf16" and r["batch"] == "64"}
    assert bf16 == {
        COMPILED: "ok",
        "chunked": "ok",
        "open_clip": "ok" if OPEN_CLIP is None else "skip",
    }
    summary = (out / "summary.md").read_text()
    assert f"- {COMPILED} bf16 B=64: compiled before timing in " in summary
    baselines = ["chunked"] + (["open_clip"] if OPEN_CLIP is None else [])
    for base in baselines:
        line = f"- {COMPILED} / {base} (bf16, B=64, D=32): memory"
        assert line in summary and line[2:] in path.with_suffix(".md").read_text()


def test_no_step_starts_without_time_left(tmp_path):
    """With too little total budget every step is reported as not run, and it fails."""
    proc = _run(tmp_path, TOTAL_BUDGET="20")
    assert proc.returncode == 1
    steps = _steps((tmp_path / "summary.md").read_text())
    assert list(steps) == STEPS
    assert all(result == "not run: no time left" for _, _, result in steps.values())
