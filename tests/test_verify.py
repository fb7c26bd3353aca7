"""``palmtree verify``: it passes on a correct library, and fails loudly otherwise.

The failure paths are driven by the command's hidden ``--inject-fault KIND:RANK``: a
rank that raises, one that hangs (the timeout must end the run and name the ranks),
one whose gradient is wrong and one whose gradient is NaN (the comparison must catch
them on any rank), and for the rows with global targets one whose labels are its own,
one that drops its negatives and one whose negatives' gradient is wrong. The pass rules
themselves are checked on ``palmtree.testing``'s truth: a result just inside its bound
passes, one just outside fails.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from palmtree import cli, testing, verify
from palmtree.verify import checks, rules, spawn, targets
from palmtree.verify.options import DEFAULT_SCALES, TARGETS

SMALL = ["--batch", "47", "--dim", "16"]


def run(capsys, *args):
    code = verify.main([*SMALL, *args])
    out, err = capsys.readouterr()
    return code, out, err


def _key(r):
    return r["loss"], r["backend"], r["precision"], r["logit_scale"], r["logit_bias"], r["targets"]


def _table_rows(out: str) -> list[dict]:
    """The text report's rows, each a dict by its table's header."""
    rows, header = [], None
    for line in out.splitlines():
        cells = line.split()
        if cells[:1] == ["backend"]:
            header = cells
        elif header and cells and cells[0] in ("reference", "chunked", "fused"):
            rows.append(dict(zip(header, cells, strict=True)))
        else:
            header = None
    return rows


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_split_is_uneven_with_an_empty_rank(n):
    for big in (47, 389, 1000):
        sizes = checks.split_sizes(big, n)
        assert sum(sizes) == big and len(sizes) == n
        if n >= 3:
            assert sizes[1] == 0
        nonempty = [s for s in sizes if s]
        assert len(set(nonempty)) == len(nonempty)  # all different


def test_three_ranks_pass_and_report_json(capsys):
    code, out, _ = run(capsys, "--nproc", "3", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["error"] is None
    assert report["world_size"] == 3 and report["sizes"][1] == 0 and sum(report["sizes"]) == 47
    # The negatives: B // 4 of them, a different count on every rank, none on rank 0, some
    # on rank 1 (which holds no pairs).
    assert report["negative_sizes"] == [0, 4, 7]
    rows = report["rows"]
    combos = {_key(r) for r in rows}
    backends, precisions = ("reference", "chunked"), ("ieee", "tf32", "bf16")
    clip = {
        ("clip", b, p, s, None, None) for b in backends for p in precisions for s in DEFAULT_SCALES
    }
    top = max(DEFAULT_SCALES)
    siglip = {
        ("siglip", b, p, top, bias, None)
        for b in backends
        for p in precisions
        for bias in (-10, 10)
    }
    targeted = {
        (loss, b, p, top, bias, t)
        for loss, bias in (("clip", None), ("siglip", -10))
        for b in backends
        for p in precisions
        for t in TARGETS
    }
    assert combos == clip | siglip | targeted and len(rows) == len(combos) == 60
    for r in rows:
        assert r["passed"] and 0 <= r["worst"] <= 1, r
        assert set(r["errors"]) == set(rules.quantities(r["loss"], r["targets"]))
        assert ("d_neg" in r["errors"]) is (r["targets"] is not None)
        for q in r["errors"]:
            assert 0 <= r["errors"][q] <= r["tolerances"][q], (r, q)
    # Tolerances follow what the precision achieves: bf16 looser than ieee. The loss's
    # bound is relative to it and derived from the computation: no fixed allowance.
    by = {_key(r): r for r in rows}
    cases = [("clip", s, None, None) for s in DEFAULT_SCALES] + [("siglip", top, -10, None)]
    cases += [
        (loss, top, bias, t) for loss, bias in (("clip", None), ("siglip", -10)) for t in TARGETS
    ]
    for loss, scale, bias, t in cases:
        ieee, bf16 = (
            by[loss, "chunked", "ieee", scale, bias, t],
            by[loss, "chunked", "bf16", scale, bias, t],
        )
        for q in ("d_image", "d_neg") if t else ("d_image",):
            assert ieee["tolerances"][q] < 1e-4 < bf16["tolerances"][q], (loss, t, q)
        assert ieee["tolerances"]["loss"] < 1e-3


def test_table_and_a_wrong_or_nan_gradient_on_one_rank_fails(capsys):
    args = ["--nproc", "2", "--precisions", "ieee,tf32", "--scales", "99"]
    code, out, _ = run(capsys, *args)
    assert code == 0, out
    assert "global batch 47 split [18, 29]" in out
    assert "labels i % 3, 11 negatives split [0, 11]" in out
    assert "CLIP (softmax)" in out and "SigLIP (sigmoid)" in out
    assert "CLIP (softmax), same-item labels and extra negatives" in out
    assert "SigLIP (sigmoid), same-item labels and extra negatives" in out
    # 12 rows without targets, 2 losses x 2 precisions x 2 backends x 3 targets with them.
    assert out.count("PASS") == 36 and "36 of 36 rows passed." in out
    assert "docs/design.md" in out  # what "exact" means, and where it is explained
    rows = _table_rows(out)
    assert len(rows) == 36 and sum("d_neg" in r for r in rows) == 24
    assert {r.get("targets") for r in rows} == {None, *TARGETS}

    code, out, _ = run(capsys, *args, "--inject-fault", "wrong:1")
    assert code == 1
    assert out.count("FAIL") == 36 and "0 of 36 rows passed." in out

    # A NaN on one rank (here the temperature's gradient) fails every row it reaches.
    code, out, _ = run(capsys, *args, "--inject-fault", "nan:0")
    assert code == 1
    assert out.count("FAIL") == 36 and "0 of 36 rows passed." in out
    rows = _table_rows(out)
    assert len(rows) == 36
    for cells in rows:
        assert cells["d_scale"] == "nan/inf" and cells["worst"] == "-", cells
        assert cells["result"] == "FAIL", cells


def test_dim_one_passes_on_three_ranks(capsys):
    """At D = 1 every unit vector is +-1 and every logit +-s: ties in every row, and a
    normalisation whose projection leaves every feature gradient exactly 0, so that an
    fp32 one is only that projection's rounding (a few ulps of the gradient before it)."""
    code, out, _ = run(capsys, "--nproc", "3", "--dim", "1", "--json")
    report = json.loads(out)
    failed = [r for r in report["rows"] if not r["passed"]]
    assert code == 0 and report["ok"] and not failed, failed
    assert len(report["rows"]) == 60  # 24 without targets, 36 with them


def test_losses_and_targets_select_the_rows(capsys):
    code, out, _ = run(
        capsys, "--nproc", "1", "--json", "--losses", "siglip", "--precisions", "ieee"
    )
    rows = json.loads(out)["rows"]
    assert code == 0 and [(r["loss"], r["logit_bias"], r["targets"]) for r in rows] == [
        ("siglip", -10.0, None),
        ("siglip", -10.0, None),
        ("siglip", 10.0, None),
        ("siglip", 10.0, None),
        *[("siglip", -10.0, t) for t in TARGETS for _ in ("reference", "chunked")],
    ]
    args = ["--losses", "clip", "--scales", "5,20", "--targets", "negatives"]
    code, out, _ = run(capsys, "--nproc", "1", "--json", *args)
    rows = json.loads(out)["rows"]
    assert code == 0 and {r["loss"] for r in rows} == {"clip"} and len(rows) == 2 * 3 * 2 + 2 * 3
    assert {(r["logit_scale"], r["targets"]) for r in rows[12:]} == {(20.0, "negatives")}
    # --targets none: the rows without targets alone.
    opts = verify.options.parse_args(["--targets", "none", "--scales", "5,20"])
    assert [(c.loss, c.targets) for c in checks.cases(opts)] == [("clip", None)] * 2 + [
        ("siglip", None)
    ] * 2


# ----------------------------------------------------------------------------- the rules


def _truth():
    img, txt = testing.make_pairs(40, 8, seed=3)
    return testing.clip_truth(img, txt, math.log(20.0), sizes=[15, 25])


@pytest.mark.parametrize("factor, passes", [(0.5, True), (2.0, False)])
def test_a_sum_passes_within_its_bound_and_fails_outside(factor, passes):
    ref = _truth()
    ours = ref.loss + factor * ref.loss_bound
    found = rules.Comparison("loss", testing.max_error(ours, ref.loss), ref.loss_bound, 1.0)
    figures = rules.figures_by_quantity([found], ["loss"])
    assert figures[0] == pytest.approx(factor)
    row = rules.Row("chunked", "ieee", 20.0, "clip")
    row = rules.judge(row, figures + [0.0, 0.0, 0.0] * 3)
    assert row.passed is passes and row.worst == pytest.approx(factor)


def test_a_gradient_tensor_passes_within_twice_plain_fp32():
    img, txt = testing.make_pairs(40, 8, seed=3)
    ref = _truth()
    plain = testing.plain_fp32(img, txt, math.log(20.0), sizes=[15, 25], precision="bf16")
    bound = testing.tensor_bound(plain["d_img"], ref.d_img)
    assert bound > 2 * testing.max_error(plain["d_img"], ref.d_img) > 0
    scale = float(ref.d_img.abs().max())
    for ours, passes in ((plain["d_img"], True), (plain["d_img"] + 3 * bound, False)):
        err = testing.max_error(ours, ref.d_img)
        assert (rules.Comparison("d_image", err, bound, scale).figures()[0] <= 1) is passes


def test_a_gradient_the_projection_zeroes_is_held_to_its_size():
    """D = 1: the truth of each feature gradient is exactly 0, and plain fp32's error is
    rounding noise at a few rows; the bound adds ``1e-6`` of the gradient's size before
    the projection (``d_img_size``) and still fails a result off by twice that."""
    img, txt = testing.make_pairs(47, 1, seed=0, noise=checks.NOISE)
    ref = testing.clip_truth(img, txt, math.log(99.0))
    plain = testing.plain_fp32(img, txt, math.log(99.0))
    assert float(ref.d_img.abs().max()) == 0.0 and ref.d_img_size > 0
    bound = testing.tensor_bound(plain["d_img"], ref.d_img, size=ref.d_img_size)
    assert bound == pytest.approx(
        2 * testing.max_error(plain["d_img"], 0 * ref.d_img) + 1e-6 * ref.d_img_size
    )
    off = torch.zeros_like(ref.d_img)
    off[3] = 2e-6 * ref.d_img_size
    testing.check_tensor("d_img", plain["d_img"], plain["d_img"], ref.d_img, size=ref.d_img_size)
    with pytest.raises(AssertionError, match="d_img"):
        testing.check_tensor("d_img", off, plain["d_img"], ref.d_img, size=ref.d_img_size)
    # Where the truth is not 0 the size changes nothing.
    img, txt = testing.make_pairs(47, 16, seed=0, noise=checks.NOISE)
    ref = testing.clip_truth(img, txt, math.log(99.0))
    plain = testing.plain_fp32(img, txt, math.log(99.0))
    unchanged = testing.tensor_bound(plain["d_img"], ref.d_img)
    assert testing.tensor_bound(plain["d_img"], ref.d_img, size=ref.d_img_size) == unchanged


@pytest.mark.parametrize("where", ["error", "bound", "size"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_nan_or_inf_anywhere_fails_the_row(where, value):
    # A NaN result fails; a NaN truth leaves nothing to compare with; a NaN bound (a NaN
    # in the plain computation) would let anything through. "<=" and max() skip NaN.
    good = dict(quantity="d_scale", error=1e-9, bound=1e-6, size=1.0)
    ok = rules.judge(rules.Row("chunked", "ieee", 20.0), _figures([rules.Comparison(**good)]))
    assert ok.passed
    bad = rules.Comparison(**{**good, where: value})
    row = rules.judge(rules.Row("chunked", "ieee", 20.0), _figures([bad]))
    assert not row.passed and row.worst is None
    json.dumps(dataclasses.asdict(row), allow_nan=False)  # reported as null, valid JSON


def _figures(d_scale: list[rules.Comparison]) -> list[float]:
    others = [rules.Comparison(q, 0.0, 1e-6, 1.0) for q in ("loss", "d_image", "d_text")]
    return rules.figures_by_quantity(others + d_scale, rules.QUANTITIES["clip"])


def test_an_empty_rank_and_a_zero_truth_compare_absolutely():
    assert rules.Comparison("loss", 0.0, 0.0, 0.0).figures() == (0.0, 0.0, 0.0)
    assert rules.Comparison("loss", 1e-30, 0.0, 0.0).figures()[0] == math.inf
    assert rules.figures_by_quantity([], ["loss"]) == [math.inf] * 3  # nothing compared


def test_the_truth_is_testings():
    # One definition: verify's data, float64 truth and fp32 scale are palmtree.testing's.
    opts = verify.options.Options(batch=30, dim=8, seed=5, precisions=("ieee",))
    img, txt = testing.make_pairs(30, 8, 5, noise=checks.NOISE)
    case = checks.cases(opts)[0]
    assert case.log_scale == float(torch.tensor(math.log(case.scale)))
    truth = checks.Truth.compute(case, "ieee", img, txt, [12, 18])
    ref = testing.clip_truth(img, txt, case.log_scale, sizes=[12, 18])
    assert torch.equal(truth.exact.shares, ref.shares) and truth.exact.loss_bound == ref.loss_bound
    assert [c.loss for c in checks.cases(opts)] == ["clip", "clip", "siglip", "siglip"] + [
        "clip"
    ] * 3 + ["siglip"] * 3


def test_the_targets_truth_is_testings():
    """The rows with targets: labels ``i % 3`` and the negatives, through testing's truth;
    the negatives' gradient bounded as the features' are."""
    opts = verify.options.Options(batch=30, dim=8, seed=5, precisions=("ieee",))
    img, txt = testing.make_pairs(30, 8, 5, noise=checks.NOISE)
    extras = targets.Extras.make(opts, 2, txt, checks.NOISE)
    assert extras.labels.tolist() == [i % 3 for i in range(30)]
    assert extras.negative_sizes == [0, 7] and extras.negatives.shape == (7, 8)
    by = {(c.loss, c.targets): c for c in checks.cases(opts)}
    for t, mode in (("positive", "positive"), ("ignore", "ignore"), ("negatives", None)):
        case = by["clip", t]
        truth = checks.Truth.compute(case, "ieee", img, txt, [12, 18], extras)
        kw = {} if mode is None else dict(labels=extras.labels, same_label=mode)
        ref = testing.clip_truth(
            img, txt, case.log_scale, sizes=[12, 18], negatives=extras.negatives, **kw
        )
        assert torch.equal(truth.exact.shares, ref.shares) and torch.equal(
            truth.exact.d_neg, ref.d_neg
        )
        assert set(truth.bounds) == {"d_img", "d_txt", "d_neg"} and truth.bounds["d_neg"] > 0
    # One rank's share of the targets: its pairs' labels, its negatives as a leaf.
    mine = extras.for_rank("ignore", 1, [12, 18], None)
    assert mine.kwargs["labels"].tolist() == [i % 3 for i in range(12, 30)]
    assert mine.kwargs["same_label"] == "ignore" and mine.kwargs["text_negatives"] is mine.negatives
    assert mine.negatives.requires_grad and mine.span == slice(0, 7)
    assert "labels" not in extras.for_rank("negatives", 1, [12, 18], None).kwargs


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_negatives_split_unevenly_with_none_on_rank_0(n):
    for big in (1, 47, 389):
        sizes = targets.negative_sizes(big, n)
        assert sum(sizes) == max(1, big // 4) and len(sizes) == n
        if n >= 2:
            assert sizes[0] == 0
        if big == 389 or (big == 47 and n <= 3):  # enough negatives for shares to differ
            nonempty = [s for s in sizes if s]
            assert len(set(nonempty)) == len(nonempty) == n - (n >= 2)


def test_a_truth_without_the_labels_fails_the_labels_rows(monkeypatch):
    """Sabotage the truth instead of the ranks (one process, in this one): a truth that
    drops the labels fails the labels rows; one with the negatives in another order (the
    same loss, their gradients on other rows) every row with them; the rows they do not
    touch still pass."""
    opts = verify.options.Options(batch=47, dim=16, precisions=("ieee",), scales=(99.0,))
    opts.losses = ("clip",)
    honest = targets.Extras.truth_kwargs

    def passed(sabotage):
        monkeypatch.setattr(targets.Extras, "truth_kwargs", sabotage)
        rows = checks.run_checks(0, 1, torch.device("cpu"), opts)
        return {(r.backend, r.targets): r.passed for r in rows}

    def no_labels(self, t):
        return {"negatives": self.negatives} if t else {}

    def shuffled_negatives(self, t):
        return {**honest(self, t), "negatives": self.negatives.flip(0)} if t else {}

    assert all(passed(honest).values())
    for sabotage, failing in (
        (no_labels, {"positive", "ignore"}),
        (shuffled_negatives, set(TARGETS)),
    ):
        for (backend, t), ok in passed(sabotage).items():
            assert ok is (t not in failing), (sabotage.__name__, backend, t)


# ----------------------------------------------------------------------------- failures


def test_a_rank_that_raises_is_named(capsys):
    code, out, err = run(capsys, "--nproc", "2", "--json", "--inject-fault", "raise:1")
    report = json.loads(out)
    assert code == 1 and not report["ok"] and report["rows"] == []
    assert report["error"].startswith("rank 1 failed: RuntimeError: injected fault"), report


@pytest.mark.parametrize(
    "fault, failing, columns",
    [
        # Rank 1's pairs get labels of their own: the labels rows fail (under "positive"
        # the negatives' gradient is untouched: no entry leaves a softmax), not the others.
        ("labels:1", {"positive", "ignore"}, {"loss", "d_image", "d_text", "d_scale"}),
        # Rank 1 holds all the negatives and passes none of them.
        ("negatives:1", set(TARGETS), {"loss", "d_image", "d_text", "d_neg", "d_scale"}),
        # Rank 2 of 3 (rank 1 holds no pairs but negatives): a wrong gradient of its
        # negatives, and nothing else.
        ("d_neg:2", set(TARGETS), {"d_neg"}),
    ],
)
def test_a_wrong_label_or_negative_on_one_rank_fails_its_rows(capsys, fault, failing, columns):
    n = "3" if fault == "d_neg:2" else "2"
    args = ["--nproc", n, "--json", "--losses", "clip", "--precisions", "ieee", "--scales", "99"]
    code, out, _ = run(capsys, *args, "--inject-fault", fault)
    rows = json.loads(out)["rows"]
    assert code == 1 and len(rows) == 2 + 2 * 3
    for r in rows:
        assert r["passed"] is (r["targets"] not in failing), (fault, r)
        if not r["passed"]:
            wrong = {q for q, e in r["errors"].items() if e is None or e > r["tolerances"][q]}
            assert wrong == columns or (fault.startswith("labels") and wrong >= columns), r


@pytest.mark.slow
def test_fused_runs_every_targets_row_in_the_interpreter(capsys, monkeypatch):
    """Fused compares the labels in its tiles: its positive, ignore and negatives rows
    are checked like the others'. Here in Triton's interpreter (conftest)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = ["--nproc", "2", "--json", "--backends", "fused", "--losses", "clip"]
    code = verify.main([*args, "--batch", "20", "--dim", "8", "--precisions", "ieee"])
    report = json.loads(capsys.readouterr().out)
    rows = [(r["backend"], r["logit_scale"], r["targets"], r["passed"]) for r in report["rows"]]
    top = max(DEFAULT_SCALES)
    assert code == 0 and rows == [
        *[("fused", s, None, True) for s in DEFAULT_SCALES],
        *[("fused", top, t, True) for t in TARGETS],
    ]


@pytest.mark.slow
def test_a_hang_times_out_naming_the_ranks(capsys):
    code, out, err = run(capsys, "--nproc", "2", "--inject-fault", "hang:1", "--timeout", "8")
    assert code == 1 and out == ""
    assert "timed out after 8 s: rank(s) 0, 1 did not finish" in err, err
    assert "  rank 1 [" in err


def test_usage_errors(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert verify.main(["--backends", "chunked,nope"]) == 2
    assert "backends must be a comma-separated subset" in capsys.readouterr().err
    assert verify.main(["--losses", "clip,triplet"]) == 2
    assert "losses must be a comma-separated subset of clip,siglip" in capsys.readouterr().err
    assert verify.main(["--scales", "0"]) == 2
    assert verify.main(["--targets", "positive,hard"]) == 2
    assert "targets must be none or a comma-separated subset of positive,ignore,negatives" in (
        capsys.readouterr().err
    )
    # 1e-46 is 0 in float32: the rows compared only rounding and passed with a NaN
    # d_scale, or with 100 % errors.
    for bad in ("1e-46", "nan", "inf", "101"):
        assert verify.main(["--scales", bad]) == 2
        assert "scales must be numbers in [1.2e-38, 100]" in capsys.readouterr().err
    # nan and inf reached the ranks' timedelta and gloo's timeout as tracebacks.
    for bad in ("nan", "inf", "0", "-3", "1e300"):
        assert verify.main(["--timeout", bad]) == 2
        assert "--timeout: must be a number of seconds in (0, 86400]" in capsys.readouterr().err
    assert verify.main(["--seed", str(2**64)]) == 2
    assert "--seed: must be an integer in [0, 2**63)" in capsys.readouterr().err
    assert verify.main(["--backends", "fused"]) == 2
    assert "backend 'fused' cannot run here" in capsys.readouterr().err
    assert cli.main(["verify", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--nproc" in help_text and "--losses" in help_text and "--targets" in help_text
    assert "Exact means (docs/design.md, section 8)" in help_text


def test_innermost_frame_of_the_checks_thread():
    dump = (
        "Thread 0x00007f (most recent call first):\n"
        '  File "/usr/lib/python3.11/threading.py", line 320 in wait\n'
        "\n"
        "Current thread 0x00007e (most recent call first):\n"
        '  File "/x/torch/distributed/distributed_c10d.py", line 4394 in all_gather_single\n'
        '  File "/x/palmtree/verify/checks.py", line 96 in run_checks\n'
    )
    where = spawn.innermost_frame(dump)
    assert where == "waiting in a collective (distributed_c10d.py:4394 all_gather_single)"
    assert spawn.innermost_frame('Current thread 0x1:\n  File "a.py", line 1 in f\n') is None


@pytest.mark.slow
def test_under_torchrun_uses_the_launched_world():
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "palmtree", "verify", "--json", "--precisions", "ieee", *SMALL,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["ok"] and report["world_size"] == 2 and "launched" in report["where"]
    # CLIP's scales and SigLIP's biases, then each loss's rows with targets.
    assert len(report["rows"]) == 2 * (len(DEFAULT_SCALES) + 2) + 2 * 2 * len(TARGETS)
