"""``palmtree bench``'s command line: bad values refused at once, measured rows never lost,
every time shown with its spread, and old CSVs still read.

Driven through ``main(argv)`` at tiny sizes in this process (``--isolate none``); timings
are never asserted, only what is written about them.
"""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pytest
import torch

from palmtree.bench import cases, check, cli, compiled, csvfile, main, measure, report, sweep

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
COMMITTED = sorted(p for p in RESULTS.glob("*.csv") if not p.name.startswith("accumulate-"))


def _argv(out: Path, *extra: str) -> list[str]:
    """One tiny in-process sweep of the chunked backend, no peers, no plot, into ``out``."""
    argv = ["--device", "cpu", "--quick", "--isolate", "none", "--backends", "chunked"]
    return [*argv, "--peers", "--no-plot", "--out", str(out), "--name", "t", *extra]


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


BAD = {
    "--batch-sizes 0": ["--batch-sizes", "0"],
    "--batch-sizes -5": ["--batch-sizes", "-5"],
    "--batch-sizes twice": ["--batch-sizes", "64", "64"],
    "--dims 0": ["--dims", "0"],
    "--out a file": ["--out", "{file}"],
    "--out under a file": ["--out", "{file}/sub"],
    "--name a/b": ["--name", "a/b"],
    "--name ..": ["--name", ".."],
    "--logit-scale nan": ["--logit-scale", "nan"],
    "--logit-scale above the cap": ["--logit-scale", "4.7"],
    "--logit-scale below float32": ["--logit-scale", "-88"],
    "--logit-bias inf": ["--loss", "siglip", "--logit-bias", "inf"],
    "--logit-bias without siglip": ["--logit-bias", "-10"],
    "--chunk-size 0": ["--chunk-size", "0"],
    "--case-timeout 0": ["--case-timeout", "0"],
    "--case-timeout nan": ["--case-timeout", "nan"],
    "--mem-limit-mb -1": ["--mem-limit-mb", "-1"],
    "--mem-limit-mb in this process": ["--mem-limit-mb", "64"],
    "--threads 0": ["--threads", "0"],
    "--repeats 0": ["--repeats", "0"],
    "--warmup -1": ["--warmup", "-1"],
    "--rounds 0": ["--rounds", "0"],
    "--seed -1": ["--seed", "-1"],
    "--seed x": ["--seed", "x"],
    "nothing to measure": ["--backends", "--peers"],
    "--plot-only without a CSV": ["--plot-only"],
}
if not torch.cuda.is_available():
    BAD["--device cuda"] = ["--device", "cuda"]


@pytest.mark.parametrize("extra", BAD.values(), ids=BAD.keys())
def test_a_bad_value_exits_2_with_one_line_before_any_work(extra, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "run_case", lambda *a: pytest.fail("a case ran"))
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "out"
    argv = _argv(out, *(x.format(file=tmp_path / "file") for x in extra))
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("palmtree bench: error: ")
    assert len(err.splitlines()) == 1, err
    flag = [x for x in extra if x.startswith("--")][-1]
    assert flag in err or "nothing to measure" in err, err
    assert not out.exists() and sorted(tmp_path.iterdir()) == [tmp_path / "file"]


@pytest.mark.parametrize("problem", ["other columns", "a folder"])
def test_an_unusable_csv_is_refused_before_any_work(problem, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "run_case", lambda *a: pytest.fail("a case ran"))
    if problem == "a folder":
        (tmp_path / "t.csv").mkdir()
    else:
        (tmp_path / "t.csv").write_text("mode,global_batch\nplain,512\n")
    with pytest.raises(SystemExit) as exc:
        main(_argv(tmp_path))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "t.csv" in err, err


def _help_blocks(text: str) -> dict[str, str]:
    """Each option's help paragraph, by its first line (``--repeats REPEATS``)."""
    blocks: dict[str, str] = {}
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            head, _, rest = line.strip().partition("  ")
            blocks[head] = rest
        elif blocks:
            blocks[head] += " " + line.strip()
    return {head: " ".join(body.split()) for head, body in blocks.items()}


def test_help_shows_every_default_on_both_devices(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    blocks = _help_blocks(capsys.readouterr().out)
    takes_a_value = [head for head in blocks if " " in head and not head.startswith("-h")]
    assert len(takes_a_value) >= 18
    for head in takes_a_value:
        assert "default" in blocks[head].lower(), head
    for key in ("batch_sizes", "dims", "precisions", "repeats", "warmup"):
        flag = "--" + key.replace("_", "-")
        (text,) = [body for head, body in blocks.items() if head.startswith(flag + " ")]
        cpu, cuda = (_words(cases.DEFAULTS[kind][key]) for kind in ("cpu", "cuda"))
        both = (
            f"default {cpu} on a CPU, {cuda} on CUDA"
            if cpu != cuda
            else f"default {cpu} on a CPU and on CUDA"
        )
        assert both in text, (flag, text)
        if key in cases.QUICK:
            assert f"--quick: {_words(cases.QUICK[key])}" in text, (flag, text)


def _words(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def test_rows_are_written_as_each_case_ends(tmp_path, monkeypatch, capsys):
    """A run that stops after its first case (interrupted here) keeps that case's row."""
    real, calls = sweep.run_case, []

    def second_interrupts(case, oracle):
        calls.append(case.batch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(case, oracle)

    monkeypatch.setattr(sweep, "run_case", second_interrupts)
    try:
        status = main(_argv(tmp_path, "--no-check"))
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped main(), the rows with it")
    assert status == 130
    assert f"interrupted: rows written to {tmp_path / 't.csv'}: 1" in capsys.readouterr().err
    (row,) = _rows(tmp_path / "t.csv")
    assert row["status"] == "ok" and int(row["batch"]) == cases.QUICK["batch_sizes"][0]


def test_an_interrupted_round_keeps_the_rounds_that_ran(tmp_path, monkeypatch):
    real, calls = sweep.run_case, []

    def third_interrupts(case, oracle):  # round 2's first case
        calls.append(case.batch)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(case, oracle)

    monkeypatch.setattr(sweep, "run_case", third_interrupts)
    assert main(_argv(tmp_path, "--no-check", "--rounds", "2", "--repeats", "2")) == 130
    rows = _rows(tmp_path / "t.csv")
    assert sorted(int(r["batch"]) for r in rows) == cases.QUICK["batch_sizes"]
    for r in rows:
        assert r["status"] == "ok" and r["repeats"] == "2", r
        assert r["note"].endswith("interrupted: 1 of 2 rounds ran"), r


def test_a_report_that_cannot_be_drawn_keeps_the_rows(tmp_path, monkeypatch, capsys):
    def broken_plot(rows, path):
        raise OSError("No space left on device")

    monkeypatch.setattr(report, "plot", broken_plot)
    argv = [x for x in _argv(tmp_path, "--no-check") if x != "--no-plot"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "No space left" in err and "--plot-only" in err
    assert str(tmp_path / "t.csv") in err
    assert len(_rows(tmp_path / "t.csv")) == len(cases.QUICK["batch_sizes"])
    assert main(["--plot-only", "--no-plot", "--out", str(tmp_path), "--name", "t"]) == 0


def test_every_time_comes_with_its_spread(tmp_path, capsys, monkeypatch):
    written = []  # the rows as measured, before the CSV rounds them to 6 digits
    real = cli.append_row
    monkeypatch.setattr(cli, "append_row", lambda path, row: written.append(row) or real(path, row))
    assert main(_argv(tmp_path, "--no-check", "--repeats", "4", "--batch-sizes", "32")) == 0
    assert re.search(r" ms +IQR \d", capsys.readouterr().out)
    (measured,) = written
    median, q1, q3 = (measured[k] for k in ("median_ms", "q1_ms", "q3_ms"))
    assert measured["min_ms"] <= q1 <= median <= q3
    assert measured["spread"] == (q3 - q1) / median
    (row,) = _rows(tmp_path / "t.csv")
    assert tuple(row) == csvfile.FIELDS and all(row[k] for k in ("q1_ms", "q3_ms", "spread"))
    table = (tmp_path / "t.md").read_text()
    assert "| median (ms) | IQR |" in table
    assert f"| {report.percent(float(row['spread']))} |" in table


def test_timing_is_the_median_and_the_interquartile_range():
    got = measure.timing([5.0, 1.0, 4.0, 2.0, 30.0])  # one outlier moves no quartile
    assert got == dict(median_ms=4.0, min_ms=1.0, q1_ms=2.0, q3_ms=5.0, spread=0.75)
    assert measure.timing([7.0]) == dict(
        median_ms=7.0, min_ms=7.0, q1_ms=None, q3_ms=None, spread=None
    )


def _row(impl: str, median: float, q1: float | None, q3: float | None) -> dict:
    base = dict(status="ok", precision="ieee", batch="64", dim="32", peak_mb="1")
    quartiles = dict(q1_ms="", q3_ms="") if q1 is None else dict(q1_ms=str(q1), q3_ms=str(q3))
    return dict(base, impl=impl, median_ms=str(median), **quartiles)


OVERLAP = ", not meaningful: the IQRs overlap"


@pytest.mark.parametrize(
    "chunked, reference, verdict",
    [
        ((2.0, 1.9, 2.1), (4.0, 3.8, 4.4), "time 0.50x (0.43 to 0.55)"),
        ((2.0, 1.0, 3.9), (4.0, 3.8, 4.4), "time 0.50x (0.23 to 1.03)" + OVERLAP),
        ((4.0, 3.8, 4.2), (4.0, 3.0, 5.0), "time 1.00x (0.76 to 1.40)" + OVERLAP),
        ((2.0, None, None), (4.0, 3.8, 4.4), "time 0.50x (spread unknown)"),
    ],
)
def test_a_time_ratio_within_the_noise_is_flagged(chunked, reference, verdict):
    rows = [_row("reference", *reference), _row("chunked", *chunked)]
    (line,) = report.target_summary(rows)
    assert line == f"chunked / reference (ieee, B=64, D=32): memory 1.000x (1/1.0), {verdict}"


def test_a_ratio_over_a_peak_that_reads_zero_is_not_printed():
    rows = [dict(_row("reference", 2, 1, 3), peak_mb="0"), _row("chunked", 2, 1, 3)]
    (line,) = report.target_summary(rows)
    assert "memory: the baseline's peak reads 0" in line and "x (1/" not in line


@pytest.mark.parametrize("path", COMMITTED, ids=[p.name for p in COMMITTED])
def test_committed_results_redraw_with_plot_only(path, tmp_path):
    shutil.copy(path, tmp_path / path.name)
    assert main(["--plot-only", "--out", str(tmp_path), "--name", path.stem]) == 0
    text = (tmp_path / path.name).with_suffix(".md").read_text()
    # Files from before the quartile columns say their spread is unknown; newer ones not.
    unknown = any(not r.get("q1_ms") for r in _rows(path))
    assert "| median (ms) | IQR |" in text and ("(spread unknown)" in text) == unknown
    assert (tmp_path / path.name).with_suffix(".png").stat().st_size > 1000
    assert (tmp_path / path.name).read_bytes() == path.read_bytes()  # only read


def test_appending_to_an_old_csv_upgrades_its_header_and_keeps_its_rows(tmp_path):
    old = RESULTS / "cpu-amd-epyc.csv"
    shutil.copy(old, tmp_path / old.name)
    assert main(_argv(tmp_path, "--no-check", "--name", old.stem, "--batch-sizes", "16")) == 0
    with (tmp_path / old.name).open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == csvfile.FIELDS
    before = _rows(old)
    assert [{k: r[k] for k in before[0]} for r in rows[: len(before)]] == before
    assert all(r["q1_ms"] == "" for r in rows[: len(before)])
    (new,) = rows[len(before) :]
    assert new["impl"] == "chunked" and new["batch"] == "16" and new["status"] == "ok"


def test_a_batch_of_one_pair_is_measured(tmp_path):
    """One pair's CLIP loss is 0: its diff is then absolute (it divided by zero)."""
    assert main(_argv(tmp_path, "--batch-sizes", "1")) == 0
    (row,) = _rows(tmp_path / "t.csv")
    assert row["status"] == "ok" and row["note"].startswith(check.WITHIN), row


def test_chunked_compile_is_a_row_when_named_and_on_cuda_by_default(tmp_path):
    """On a CPU Inductor's C++ build takes minutes at the default sizes (301 s at 8192):
    named only; on CUDA with Triton a default row beside fused."""
    run = cli.parse(["--device", "cpu", "--no-plot", "--out", str(tmp_path)])
    assert run.sweep.impls[:2] == ["reference", "chunked"]
    assert compiled.COMPILED not in run.sweep.impls
    argv = ["--device", "cpu", "--backends", compiled.COMPILED, "--peers", "--no-plot"]
    assert cli.parse([*argv, "--out", str(tmp_path)]).sweep.impls == [compiled.COMPILED]


def test_each_rounds_compile_time_is_in_the_note_apart_from_the_times():
    ok = dict(status="ok", note=f"{check.WITHIN} (loss 1e-04)", loss=1.0, peak_mb=5.0)
    results = [
        dict(ok, times=[10.0, 11.0], compile_s=21.04, graphs=1),
        dict(ok, times=[12.0, 13.0], compile_s=3.0, graphs=1),
    ]
    row = sweep.combine_rounds(results)
    assert row["median_ms"] == 11.5  # the timed runs only
    compile_part = "compiled before timing in 21.0, 3.0 s (dynamic=False, 1 graph)"
    assert row["note"] == f"{check.WITHIN} (loss 1e-04); {compile_part}"
    assert sweep.combine_rounds([dict(ok, times=[1.0])])["note"] == ok["note"]
    cells = dict.fromkeys(csvfile.FIELDS, "") | _row(compiled.COMPILED, 2, 1, 3)
    table = report.markdown_table([dict(cells, note=row["note"])])
    assert table.endswith(f"| ok; {compile_part} |")


def test_chunked_compile_is_compared_with_chunked_first():
    rows = [
        _row("open_clip", 8, 7, 9),
        _row("chunked", 4, 3.8, 4.2),
        _row(compiled.COMPILED, 2, 1.9, 2.1),
    ]
    assert report.target_summary(rows) == [
        "chunked / open_clip (ieee, B=64, D=32): memory 1.000x (1/1.0), time 0.50x (0.42 to 0.60)",
        f"{compiled.COMPILED} / chunked (ieee, B=64, D=32): memory 1.000x (1/1.0), time 0.50x"
        " (0.45 to 0.55)",
        f"{compiled.COMPILED} / open_clip (ieee, B=64, D=32): memory 1.000x (1/1.0), time 0.25x"
        " (0.21 to 0.30)",
    ]
