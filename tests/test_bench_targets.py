"""``palmtree bench --labels K --negatives R``: every case gets same-item labels and extra
negative text columns, its row says so in ``impl``, the float64 check covers them (the
negatives' gradient included), and what cannot take them is a skip row with the reason.

Tiny sizes (``--quick``) in this process; timings are never asserted.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from palmtree import testing
from palmtree.bench import cases, check, cli, main, peers, report, sweep
from palmtree.bench.targets import NEGATIVES_SEED, TargetSpec, split_tag

TAG = "[labels=3 negatives=1xB]"


def _argv(out: Path, *extra: str) -> list[str]:
    argv = ["--device", "cpu", "--quick", "--isolate", "none", "--no-plot"]
    return [*argv, "--out", str(out), "--name", "t", *extra]


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_quick_rows_with_labels_and_negatives_are_marked_and_checked(loss, tmp_path, capsys):
    argv = ["--loss", loss, "--backends", "reference", "chunked", "--peers"]
    assert main(_argv(tmp_path, *argv, "--labels", "3", "--negatives", "1")) == 0
    prefix = "" if loss == "clip" else "siglip:"
    rows = _rows(tmp_path / "t.csv")
    assert sorted((r["impl"], int(r["batch"])) for r in rows) == sorted(
        (f"{prefix}{impl}{TAG}", b) for impl in ("reference", "chunked") for b in (64, 128)
    )
    for r in rows:
        assert r["status"] == "ok" and r["note"].startswith(check.WITHIN), r
        assert float(r["loss_diff"]) < 1e-5 and float(r["grad_diff"]) < 1e-4, r
    out = capsys.readouterr().out
    assert "labels i % 3 (positive), round(1 * B) extra negatives" in out.splitlines()[0]
    table = (tmp_path / "t.md").read_text()
    assert f"| {prefix}chunked{TAG} | ieee | 128 | 32 |" in table
    assert f"{prefix}chunked{TAG} / {prefix}reference{TAG} (ieee, B=128, D=32)" in table


def test_rows_with_and_without_targets_are_never_confused(tmp_path):
    """Three runs into one CSV: their ``impl`` cells differ, and a ratio only pairs rows
    with the same targets."""
    base = _argv(tmp_path, "--backends", "chunked", "--peers", "--no-check", "--batch-sizes", "16")
    for extra in ([], ["--labels", "3", "--same-label", "ignore"], ["--negatives", "0.5"]):
        assert main([*base, *extra]) == 0
    impls = [r["impl"] for r in _rows(tmp_path / "t.csv")]
    assert impls == ["chunked", "chunked[labels=3 same=ignore]", "chunked[negatives=0.5xB]"]
    assert [split_tag(x) for x in impls] == [
        ("chunked", ""),
        ("chunked", "[labels=3 same=ignore]"),
        ("chunked", "[negatives=0.5xB]"),
    ]
    row = dict(status="ok", precision="ieee", batch="64", dim="32", median_ms="2", peak_mb="1")
    rows = [dict(row, impl="reference"), dict(row, impl="chunked[labels=3]")]
    assert report.target_summary(rows) == []
    rows.append(dict(row, impl="reference[labels=3]", median_ms="4"))
    (line,) = report.target_summary(rows)
    assert line.startswith("chunked[labels=3] / reference[labels=3] (ieee, B=64, D=32)")


def test_inputs_are_seeded_and_the_truth_gets_them():
    spec = TargetSpec(labels=10, negatives=0.5)
    extras = cases.make_targets(spec, 64, 16, seed=4, device="cpu")
    assert torch.equal(extras["labels"], torch.arange(64) % 10)
    (_, neg) = testing.make_pairs(32, 16, 4 + NEGATIVES_SEED, noise=cases.NOISE)
    assert torch.equal(extras["text_negatives"], neg)
    img, txt = cases.make_inputs(64, 16, seed=4, device="cpu")
    assert not torch.equal(neg, txt[:32])
    assert cases.make_targets(TargetSpec(), 64, 16, 4, "cpu") == {}
    assert cases.make_targets(TargetSpec(negatives=0.001), 64, 16, 4, "cpu")[
        "text_negatives"
    ].shape == (0, 16)
    exact = check.truth(img, txt, math.log(1 / 0.07), "ieee", "clip", extras=extras)
    plain = check.truth(img, txt, math.log(1 / 0.07), "ieee", "clip")
    assert exact["d_neg"].shape == (32, 16) and "d_neg" not in plain
    assert float(exact["loss"]) > float(plain["loss"])  # more columns, fewer hits


def test_the_negatives_gradient_is_checked():
    spec = TargetSpec(labels=3, negatives=1)
    case = cases.Case("chunked", "ieee", 64, 16, "cpu", 1, 0, 0, math.log(1 / 0.07))
    case = cases.Case(**{**case.__dict__, "labels": 3, "negatives": 1.0})
    extras = cases.make_targets(spec, 64, 16, 0, "cpu")
    img, txt = cases.make_inputs(64, 16, 0, "cpu")
    exact = check.truth(img, txt, case.log_scale, "ieee", extras=extras)
    neg = extras["text_negatives"].clone().requires_grad_()
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    (scale,) = cases.scalar_leaves(case, torch.device("cpu"))
    value = cases.loss_fn(case)(i, t, scale, labels=extras["labels"], text_negatives=neg)
    value.backward()
    grads = dict(d_img=i.grad, d_txt=t.grad, d_scale=scale.grad, d_neg=neg.grad)
    good = check.compare("ieee", value.detach(), grads, exact)
    assert good["note"].startswith(check.WITHIN) and good["grad_diff"] < 1e-4
    bad = check.compare("ieee", value.detach(), dict(grads, d_neg=2 * neg.grad), exact)
    assert bad["grad_diff"] > 0.5  # only d_neg is off


def test_peers_skip_with_their_reasons_and_fused_runs(tmp_path):
    argv = ["--backends", "fused", "chunked", "--peers", "open_clip", "inf_cl", "--no-check"]
    assert main(_argv(tmp_path, *argv, "--batch-sizes", "16", "--labels", "2")) == 0
    rows = {r["impl"]: r for r in _rows(tmp_path / "t.csv")}
    assert rows["chunked[labels=2]"]["status"] == "ok"
    assert rows["fused[labels=2]"]["status"] == "ok"  # in the interpreter here (conftest)
    for peer in ("open_clip", "inf_cl"):
        row = rows[f"{peer}[labels=2]"]
        assert row["status"] == "skip", row
        assert (
            row["note"] == f"{peer} takes neither same-item labels nor extra negatives (--labels)"
        )
    spec = TargetSpec(negatives=1.0)
    assert cases.skip_reason("open_clip", "ieee", torch.device("cpu"), targets=spec) == (
        "open_clip takes neither same-item labels nor extra negatives (--negatives)"
    )
    assert "fused takes" not in (
        cases.skip_reason("fused", "ieee", torch.device("cpu"), targets=spec) or ""
    )


def test_by_default_only_what_takes_the_targets_runs(tmp_path):
    argv = ["--device", "cpu", "--no-plot", "--out", str(tmp_path)]
    run = cli.parse([*argv, "--labels", "4"])
    plain = cli.parse(argv).sweep.impls  # fused among them in the interpreter (conftest)
    assert run.sweep.impls == [i for i in plain if i not in peers.PEERS]
    assert run.sweep.impls[:2] == ["reference", "chunked"]
    assert run.sweep.targets == TargetSpec(4, "positive", 0.0)
    case = run.sweep.case((32, 64, "chunked", "ieee"), None)
    assert (case.labels, case.same_label, case.negatives) == (4, "positive", 0.0)


BAD = {
    "--labels 0": ["--labels", "0"],
    "--labels -2": ["--labels", "-2"],
    "--labels x": ["--labels", "x"],
    "--negatives -1": ["--negatives", "-1"],
    "--negatives nan": ["--negatives", "nan"],
    "--negatives inf": ["--negatives", "inf"],
    "--same-label other": ["--labels", "3", "--same-label", "other"],
    "--same-label without labels": ["--same-label", "ignore"],
}


@pytest.mark.parametrize("extra", BAD.values(), ids=BAD.keys())
def test_a_bad_target_value_exits_2_with_one_line(extra, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "run_case", lambda *a: pytest.fail("a case ran"))
    with pytest.raises(SystemExit) as exc:
        main(_argv(tmp_path / "out", "--backends", "chunked", "--peers", *extra))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("palmtree bench: error: ")
    assert len(err.splitlines()) == 1 and extra[-2] in err, err
    assert not (tmp_path / "out").exists()


def test_help_shows_the_targets_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "i % K" in text and "Default 0: off" in text
    assert "Default positive" in text and "Default 0: none" in text
