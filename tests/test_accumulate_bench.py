"""``benchmarks/accumulate.py`` at tiny sizes: it runs both modes, writes its files, and
reports running out of memory as a row. Timings are never asserted."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accumulate.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("accumulate_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defined
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _rows(path: Path, fields) -> list[dict]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == fields
        return list(reader)


def test_quick_run_writes_csv_table_and_plot(bench, tmp_path):
    assert bench.main(["--quick", "--out", str(tmp_path), "--name", "t"]) == 0
    rows = _rows(tmp_path / "t.csv", bench.FIELDS)
    batches = bench.QUICK["global_batches"]
    assert sorted((r["mode"], int(r["global_batch"])) for r in rows) == sorted(
        (mode, big) for mode in bench.MODES for big in batches
    )
    by = {(r["mode"], int(r["global_batch"])): r for r in rows}
    for big in batches:
        plain, acc = by["plain", big], by["accumulate", big]
        assert plain["status"] == acc["status"] == "ok", (plain, acc)
        assert int(plain["micro_batch"]) == big
        assert int(acc["micro_batch"]) == bench.QUICK["micro_batch"]
        for r in (plain, acc):
            assert float(r["median_ms"]) > 0 and float(r["peak_mb"]) >= 0
        # The same seed, model and data: both modes compute the same first loss.
        assert math.isclose(float(plain["loss"]), float(acc["loss"]), rel_tol=1e-5)
        # The cached features: [B, image_dim] and [B, L, text_width] in fp32.
        config = bench.ModelConfig()
        size = big * (config.image_dim + int(acc["tokens"]) * config.text_width) * 4 / 2**20
        assert math.isclose(float(acc["features_mb"]), size, rel_tol=1e-5)
    table = (tmp_path / "t.md").read_text()
    assert all(f"| {big} |" in table for big in batches)
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_running_out_of_memory_is_a_row_and_stops_that_mode(bench, tmp_path):
    """Under a cap that the plain step of 512 pairs exceeds, plain is ``oom`` there and
    not run at the larger batch; accumulation, 8 pairs at a time, still runs."""
    argv = ["--quick", "--global-batches", "16", "512", "1024", "--mem-limit-mb", "48"]
    assert bench.main([*argv, "--threads", "1", "--out", str(tmp_path), "--name", "t"]) == 0
    by = {(r["mode"], int(r["global_batch"])): r for r in _rows(tmp_path / "t.csv", bench.FIELDS)}
    assert by["plain", 16]["status"] == "ok"
    assert by["plain", 512]["status"] == "oom"
    assert by["plain", 1024]["status"] == "oom"
    assert by["plain", 1024]["note"] == "not run: out of memory at B=512"
    assert all(by["accumulate", big]["status"] == "ok" for big in (16, 512, 1024))
    assert "oom" in (tmp_path / "t.md").read_text()


def test_micro_batches_cover_the_global_batch_in_order(bench):
    batch = bench.make_batch(10, seed=0)
    micro = bench.micro_batches(batch, 4)
    assert [len(mb[0]) for mb in micro] == [4, 4, 2]
    for part, whole in zip(zip(*micro, strict=True), batch, strict=True):
        assert torch.equal(torch.cat(part), whole)


def test_committed_results_are_readable_by_this_version(bench):
    files = sorted((SCRIPT.parent / "results").glob("accumulate-*.csv"))
    assert files
    for path in files:
        rows = _rows(path, bench.FIELDS)
        assert {r["mode"] for r in rows} == set(bench.MODES), path
