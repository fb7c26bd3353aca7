"""``palmtree bench`` end to end at tiny sizes, its float64 check, and the peer loaders.

Timings are never asserted: only that every case ran, wrote its row, and that the
correctness columns say the loss and gradients match float64 within testing's bounds.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from palmtree import clip_loss, siglip_loss, testing
from palmtree.bench import (
    FIELDS,
    cases,
    check,
    cli,
    compiled,
    csvfile,
    main,
    markdown_table,
    measure,
    peers,
    report,
    sweep,
)
from palmtree.options import LOSSES

OPEN_CLIP = peers.peer_status("open_clip", "cpu")
needs_open_clip = pytest.mark.skipif(OPEN_CLIP is not None, reason=str(OPEN_CLIP))
SRC = Path(__file__).resolve().parents[1] / "src" / "palmtree"
#: What is not the library: the command line and the tools it starts.
TOOLS = ("bench", "train", "verify", "cli.py", "__main__.py")


def _autograd_fp64(img, txt, log_scale, cap=100.0):
    i = img.double().requires_grad_()
    t = txt.double().requires_grad_()
    ls = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
    u, v = F.normalize(i, dim=-1, eps=1e-6), F.normalize(t, dim=-1, eps=1e-6)
    logits = ls.exp().clamp(max=cap) * u @ v.T
    labels = torch.arange(len(u))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    return loss.detach(), i.grad, t.grad, ls.grad


@pytest.mark.parametrize("log_scale", [math.log(1 / 0.07), math.log(100) + 0.5])
def test_truth_is_the_float64_loss_with_the_bench_cap(log_scale):
    """Above the cap the scale is clamped: its gradient is 0, and so is its bound."""
    img, txt = cases.make_inputs(70, 24, seed=1, device="cpu")
    loss, d_img, d_txt, d_scale = _autograd_fp64(img, txt, log_scale)
    got = check.truth(img, txt, log_scale, "ieee")
    # Two float64 computations in different orders: each rounds sums of B = 70 terms of
    # logits up to the scale (100), so they agree to 100 * 70 units of float64's rounding
    # (2**-53) of each value's largest entry.
    tol = 100 * 70 * 2.0**-53
    for name, exact in (("loss", loss), ("d_img", d_img), ("d_txt", d_txt), ("d_scale", d_scale)):
        assert testing.max_error(got[name], exact) <= tol * float(exact.abs().max()), name
    assert got["precision"] == "ieee" and 0 < got["loss_bound"] < 1e-3 * float(loss)
    assert (got["d_scale_bound"] == 0) == (log_scale > math.log(100))


def test_reference_follows_the_device_of_its_inputs():
    """The bench computes the truth on the GPU: every tensor ``testing.clip_truth`` makes
    must be on its inputs' device. Under a ``meta`` default device, one made without
    ``device=`` lands on ``meta`` and the computation raises."""
    img, txt = testing.make_pairs(40, 12, seed=2)
    kw = dict(sizes=[15, 0, 25], weights=[1.0, 2.0, 0.5], block=16)
    expected = testing.clip_truth(img, txt, 2.3, **kw)
    with torch.device("meta"):
        got = testing.clip_truth(img, txt, 2.3, **kw)
    for name in ("loss", "shares", "d_img", "d_txt", "d_scale", "share_bounds"):
        assert getattr(got, name).device.type == "cpu", name
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert got.loss_bound == expected.loss_bound


def test_inputs_are_testings_correlated_pairs():
    img, txt = cases.make_inputs(256, 256, seed=0, device="cpu")
    same = testing.make_pairs(256, 256, seed=0, noise=cases.NOISE)
    assert torch.equal(img, same[0]) and torch.equal(txt, same[1])
    cos = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    assert cos.diagonal().min() > 0.3 and cos.fill_diagonal_(0).abs().mean() < 0.1
    loss = float(clip_loss(img, txt, math.log(1 / 0.07)).loss)
    assert 0.05 < loss < math.log(256) / 2  # neither trivial nor uncorrelated


def _chunked_case(loss: str, img, txt, log_scale: float) -> tuple[torch.Tensor, dict]:
    """``loss`` by the chunked backend at the bench's settings: the loss and its grads."""
    case = cases.Case("chunked", "ieee", len(img), img.shape[1], "cpu", 1, 0, 0, log_scale)
    case = dataclasses.replace(case, loss=loss)
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scalars = cases.scalar_leaves(case, torch.device("cpu"))
    loss_value = cases.loss_fn(case)(i, t, *scalars)
    loss_value.backward()
    grads = dict(d_img=i.grad, d_txt=t.grad)
    grads.update(zip(cases.SCALAR_GRADS[loss], (x.grad for x in scalars), strict=True))
    return loss_value.detach(), grads


@pytest.mark.parametrize("loss", LOSSES)
def test_verdict_holds_fp32_within_the_bounds_and_flags_what_is_not(loss):
    img, txt = cases.make_inputs(64, 16, seed=3, device="cpu")
    log_scale = math.log(1 / 0.07) if loss == "clip" else cases.SIGLIP_LOG_SCALE
    exact = check.truth(img, txt, log_scale, "ieee", loss)
    value, grads = _chunked_case(loss, img, txt, log_scale)
    got = check.compare("ieee", value, grads, exact)
    assert got["note"].startswith(check.WITHIN) and got["loss_diff"] < 1e-6
    assert ("d_bias" in got["note"]) == (loss == "siglip")
    assert check.compare("bf16", value, grads, exact)["note"] == ""

    off = float(exact["loss"]) + 2 * exact["loss_bound"]
    assert check.verdict(torch.tensor(off), grads, exact).startswith(check.OUTSIDE + ": loss")
    for name in cases.SCALAR_GRADS[loss]:
        nan = check.verdict(value, dict(grads, **{name: torch.tensor(math.nan)}), exact)
        assert nan.startswith(f"{check.OUTSIDE}: {name}")


def _autograd_fp64_siglip(img, txt, log_scale, bias, cap=100.0):
    i, t = img.double().requires_grad_(), txt.double().requires_grad_()
    ls = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    u, v = F.normalize(i, dim=-1, eps=1e-6), F.normalize(t, dim=-1, eps=1e-6)
    logits = ls.exp().clamp(max=cap) * u @ v.T + b
    z = 2 * torch.eye(len(u), dtype=torch.float64) - 1
    loss = -F.logsigmoid(z * logits).sum() / len(u)
    loss.backward()
    return dict(loss=loss.detach(), d_img=i.grad, d_txt=t.grad, d_scale=ls.grad, d_bias=b.grad)


def test_siglip_truth_is_the_float64_sigmoid_loss():
    img, txt = cases.make_inputs(70, 24, seed=1, device="cpu")
    want = _autograd_fp64_siglip(img, txt, cases.SIGLIP_LOG_SCALE, cases.SIGLIP_BIAS)
    got = check.truth(img, txt, cases.SIGLIP_LOG_SCALE, "ieee", "siglip")
    assert got["loss_kind"] == "siglip" and set(want) < set(got)
    # Two float64 computations in different orders: sums of B^2 = 4900 terms.
    tol = 4900 * 2.0**-53
    for name, exact in want.items():
        assert testing.max_error(got[name], exact) <= tol * float(exact.abs().max()), name
    for name in ("loss", "d_scale", "d_bias"):
        assert 0 < got[f"{name}_bound"] < 1e-3 * abs(float(want[name])), name


def test_table_shows_only_the_notes_that_matter():
    row = dict(zip(FIELDS, [""] * len(FIELDS), strict=True))
    row.update(impl="chunked", precision="ieee", batch="64", dim="16", status="ok")
    within = dict(row, note=f"{check.WITHIN} (loss 1e-04, d_scale 1e-03 relative)")
    outside = dict(row, batch="128", note=f"{check.OUTSIDE}: loss off by 1e-02 > 1e-04")
    skipped = dict(row, batch="256", status="skip", note="no TF32 on a CPU")
    lines = markdown_table([within, outside, skipped]).splitlines()[2:]
    assert lines[0].endswith("| ok |")
    assert lines[1].endswith(f"| ok; {outside['note']} |")
    assert lines[2].endswith("| skip: no TF32 on a CPU |")


def test_cpu_peak_memory_sees_an_allocation():
    probe = measure.PeakMemory(torch.device("cpu"))
    probe.start()
    x = torch.ones(16 << 20)  # 64 MiB, touched
    del x
    assert 60 <= probe.peak_mb() < 200


@needs_open_clip
def test_open_clip_loss_module_loads_without_the_package():
    module = peers.load_open_clip_loss_module()
    assert hasattr(module, "ClipLoss")
    if "open_clip" not in sys.modules:  # unless something else imported the package
        assert module.__name__ != "open_clip.loss"


@needs_open_clip
def test_open_clip_gives_palmtree_loss_and_gradients():
    img, txt = cases.make_inputs(96, 40, seed=3, device="cpu")
    grads = []
    for fn in (peers.open_clip_loss, lambda i, t, s: clip_loss(i, t, s, precision="ieee").loss):
        i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
        s = torch.tensor(math.log(1 / 0.07), requires_grad=True)
        loss = fn(i, t, s)
        loss.backward()
        grads.append((loss.detach(), i.grad, t.grad, s.grad))
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-7)


@needs_open_clip
def test_open_clip_siglip_gives_palmtree_loss_and_gradients():
    img, txt = cases.make_inputs(96, 40, seed=3, device="cpu")
    grads = []
    ours = lambda i, t, s, b: siglip_loss(i, t, s, b, precision="ieee").loss  # noqa: E731
    for fn in (peers.open_clip_siglip_loss, ours):
        i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
        s = torch.tensor(cases.SIGLIP_LOG_SCALE, requires_grad=True)
        b = torch.tensor(cases.SIGLIP_BIAS, requires_grad=True)
        loss = fn(i, t, s, b)
        loss.backward()
        grads.append((loss.detach(), i.grad, t.grad, s.grad, b.grad))
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-7)


def test_inf_cl_reports_why_it_cannot_run_on_cpu():
    why = peers.peer_status("inf_cl", "cpu")
    assert why is not None and "CUDA" in why
    why = cases.skip_reason("inf_cl", "tf32", torch.device("cuda"), "siglip")
    assert why == "Inf-CL has no sigmoid loss"


def _read_csv(path: Path, layouts=(FIELDS,)) -> list[dict]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) in layouts
        return list(reader)


def test_quick_sweep_writes_rows_table_and_plot(tmp_path):
    impl_peers = ["inf_cl"] + (["open_clip"] if OPEN_CLIP is None else [])
    argv = ["--quick", "--device", "cpu", "--out", str(tmp_path), "--name", "t"]
    argv += ["--backends", "reference", "chunked", "--peers", *impl_peers]
    assert main(argv) == 0

    rows = _read_csv(tmp_path / "t.csv")
    impls = ["reference", "chunked", *impl_peers]
    assert sorted((r["impl"], int(r["batch"])) for r in rows) == sorted(
        (impl, b) for impl in impls for b in cases.QUICK["batch_sizes"]
    )
    for r in rows:
        assert r["device"] and r["torch_version"] == torch.__version__ and r["timestamp"]
        if r["impl"] == "inf_cl":
            assert r["status"] == "skip" and "CUDA" in r["note"]
            continue
        assert r["status"] == "ok", r
        assert float(r["median_ms"]) > 0 and float(r["peak_mb"]) >= 0
        assert float(r["loss"]) > 0
        assert float(r["loss_diff"]) < 1e-5 and float(r["grad_diff"]) < 1e-4, r
        assert r["note"].startswith(check.WITHIN), r
    assert (tmp_path / "t.png").stat().st_size > 1000
    table = (tmp_path / "t.md").read_text()
    assert "| chunked | ieee | 128 | 32 |" in table
    assert "chunked / reference (ieee, B=128, D=32): memory" in table


def test_siglip_sweep_by_default_writes_under_runs(tmp_path, monkeypatch):
    """``--loss siglip``: rows named ``siglip:<impl>``, checked against the sigmoid truth
    (d_bias included), Inf-CL a skip row; files go to runs/bench/<device>-siglip.*, and
    nothing to benchmarks/results."""
    monkeypatch.chdir(tmp_path)
    impl_peers = ["inf_cl"] + (["open_clip"] if OPEN_CLIP is None else [])
    argv = ["--quick", "--device", "cpu", "--loss", "siglip", "--isolate", "none"]
    assert main([*argv, "--backends", "reference", "chunked", "--peers", *impl_peers]) == 0

    out = tmp_path / "runs" / "bench"
    (path,) = out.glob("*.csv")
    assert path.stem == cli.default_name(torch.device("cpu"), "siglip")
    assert path.stem.endswith("-siglip") and not (tmp_path / "benchmarks").exists()
    rows = _read_csv(path)
    labels = {f"siglip:{impl}" for impl in ["reference", "chunked", *impl_peers]}
    assert {r["impl"] for r in rows} == labels
    for r in rows:
        if r["impl"] == "siglip:inf_cl":
            assert r["status"] == "skip" and r["note"] == "Inf-CL has no sigmoid loss"
            continue
        assert r["status"] == "ok", r
        assert float(r["loss_diff"]) < 1e-5 and float(r["grad_diff"]) < 1e-4, r
        assert r["note"].startswith(check.WITHIN) and "d_bias" in r["note"], r
    table = path.with_suffix(".md").read_text()
    assert "| siglip:chunked | ieee | 128 | 32 |" in table
    assert "siglip:chunked / siglip:reference (ieee, B=128, D=32)" in table
    if OPEN_CLIP is None:
        assert "siglip:chunked / siglip:open_clip (ieee, B=128, D=32)" in table


@pytest.mark.slow
def test_chunked_compile_is_compiled_before_timing_and_checked_against_float64(tmp_path):
    """One tiny ``chunked+compile`` case (Inductor builds C++ on a CPU: ~20 s), through
    the whole command: its row gets the float64 check like every other, and its compile
    time is in the note and the table, apart from the timed runs; it is compared with
    chunked in eager mode."""
    argv = ["--quick", "--device", "cpu", "--isolate", "none", "--batch-sizes", "64"]
    argv += ["--repeats", "2", "--backends", compiled.COMPILED, "chunked", "--peers"]
    assert main([*argv, "--no-plot", "--out", str(tmp_path), "--name", "t"]) == 0

    row = {r["impl"]: r for r in _read_csv(tmp_path / "t.csv")}[compiled.COMPILED]
    assert row["status"] == "ok" and row["impl_version"].startswith("palmtree "), row
    assert float(row["loss_diff"]) < 1e-5 and float(row["grad_diff"]) < 1e-4, row
    verdict, compile_part = row["note"].split("; ")
    assert verdict.startswith(check.WITHIN), row
    assert re.fullmatch(
        r"compiled before timing in \d+\.\d s \(dynamic=False, \d+ graphs?\)", compile_part
    )
    table = (tmp_path / "t.md").read_text()
    assert f"| {compiled.COMPILED} | ieee | 64 | 32 |" in table
    assert f"| ok; {compile_part} |" in table
    assert f"{compiled.COMPILED} / chunked (ieee, B=64, D=32): memory" in table


def test_a_compilation_while_timing_is_an_error():
    """The timed runs of ``chunked+compile`` run compiled code only: a guard that fails
    there raises instead of compiling inside the measured region (Dynamo alone here,
    ``backend="eager"``, so no C++ is built)."""
    fn = torch.compile(lambda x: (x * 2).sum(), backend="eager", dynamic=False)
    fn(torch.ones(4))
    with compiled.steady("chunked"):
        fn(torch.ones(5))  # other implementations: nothing changes
    with compiled.steady(compiled.COMPILED):
        fn(torch.ones(4))
        with pytest.raises(RuntimeError, match="recompile"):
            fn(torch.ones(6))


def test_chunked_compile_without_a_cpp_compiler_is_a_skip(monkeypatch):
    from torch._inductor import cpp_builder

    def none_found():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", none_found)
    why = cases.skip_reason(compiled.COMPILED, "ieee", torch.device("cpu"))
    assert why == "torch.compile on a CPU needs a C++ compiler (RuntimeError)"


def test_labels_carry_the_loss_and_clip_rows_keep_their_names():
    assert cases.impl_label("chunked", "clip") == "chunked"
    for loss in LOSSES:
        for impl in ("chunked", "open_clip", "inf_cl"):
            assert cases.split_label(cases.impl_label(impl, loss)) == (loss, impl)


def test_committed_results_are_readable_by_this_version():
    """The reference results under benchmarks/results have a layout this version reads
    (the current one, or the one before the quartile columns), so a table or a plot can be
    redrawn from them (``--plot-only``, tests/test_bench_cli.py) and runs appended."""
    results = SRC.parents[1] / "benchmarks" / "results"
    files = sorted(p for p in results.glob("*.csv") if not p.name.startswith("accumulate-"))
    assert files
    for path in files:
        rows = _read_csv(path, (FIELDS, csvfile.LEGACY_FIELDS))
        assert rows and {r["status"] for r in rows} <= set(csvfile.STATUSES), path


def test_out_of_memory_is_a_row_not_a_crash():
    # Reference logits for B=4096 need ~0.4 GB; the worker may grow by 64 MB at most.
    case = cases.Case(
        impl="reference",
        precision="ieee",
        batch=4096,
        dim=16,
        device="cpu",
        repeats=1,
        warmup=0,
        seed=0,
        log_scale=1.0,
        mem_limit_mb=64,
    )
    result = measure.run_case_in_process(case, timeout=120)
    assert result["status"] == "oom", result


def test_bench_is_a_cli_subcommand(capsys):
    from palmtree import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    assert "--batch-sizes" in capsys.readouterr().out


def test_rounds_pool_timed_runs_and_keep_worst_memory_and_error():
    ok = dict(status="ok", note="", loss=1.0)
    outside = f"{check.OUTSIDE}: loss off by 3e-03 > 1e-03"
    results = [
        dict(ok, times=[10.0, 11.0], peak_mb=5.0, loss_diff=1e-7, grad_diff=1e-6),
        dict(status="error", note="boom"),
        dict(ok, times=[30.0, 12.0], peak_mb=7.0, loss_diff=2e-7, grad_diff=1e-6, note=outside),
    ]
    row = sweep.combine_rounds(results)
    assert row["status"] == "ok" and row["repeats"] == 4
    assert row["median_ms"] == 11.5 and row["min_ms"] == 10.0 and row["peak_mb"] == 7.0
    # The quartiles of all 4 pooled runs (10, 11, 12, 30), not of one round's.
    assert row["q1_ms"] == 10.75 and row["q3_ms"] == 16.5
    assert row["loss_diff"] == 2e-7
    assert row["note"] == f"{outside}; 1 of 3 rounds failed, first: error: boom"
    assert sweep.combine_rounds([dict(status="oom", note="x")])["status"] == "oom"


def test_ratios_survive_a_peak_that_reads_zero():
    base = dict(status="ok", precision="ieee", batch="64", dim="32", median_ms="2")
    rows = [dict(base, impl="reference", peak_mb="1.5"), dict(base, impl="fused", peak_mb="0")]
    assert report.target_summary(rows) == [
        "fused / reference (ieee, B=64, D=32): memory 0.000x, time 1.00x (spread unknown)"
    ]


def test_ratios_compare_within_one_loss():
    base = dict(status="ok", precision="ieee", batch="64", dim="32", median_ms="2")
    rows = [
        dict(base, impl="reference", peak_mb="8"),
        dict(base, impl="chunked", peak_mb="1"),
        dict(base, impl="siglip:open_clip", peak_mb="4", median_ms="4"),
        dict(base, impl="siglip:chunked", peak_mb="1"),
    ]
    assert report.target_summary(rows) == [
        "chunked / reference (ieee, B=64, D=32): memory 0.125x (1/8.0), time 1.00x"
        " (spread unknown)",
        "siglip:chunked / siglip:open_clip (ieee, B=64, D=32): memory 0.250x (1/4.0), time 0.50x"
        " (spread unknown)",
    ]


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, relative imports resolved against ``palmtree``."""
    package = ["palmtree", *path.relative_to(SRC).parent.parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module or "").split(".")]).strip(".")
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_the_library_never_imports_the_bench():
    files = [p for p in SRC.rglob("*.py") if p.relative_to(SRC).parts[0] not in TOOLS]
    assert len(files) > 30  # the losses, backends, accumulate, compat, testing, ...
    for path in files:
        bad = {m for m in _imported_modules(path) if m.startswith("palmtree.bench")}
        assert not bad, (path, bad)
    # The scan does see an import of the bench where there is one.
    assert "palmtree.bench.peers" in _imported_modules(SRC / "bench" / "cases.py")


def test_a_missing_plot_library_is_said_before_any_work(monkeypatch, capsys, tmp_path):
    """Without the [bench] extra the run stops at once and names it (it used to crash at
    the end, after the whole sweep, on importing matplotlib)."""
    import importlib.util

    from palmtree.bench import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name)
    )
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "pip install '.[bench]'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written
