"""``palmtree bench`` end to end at tiny sizes, its float64 oracle, and the peer loaders.

Timings are never asserted: only that every case ran, wrote its row, and that the
correctness columns say the loss and gradients match float64.
"""

from __future__ import annotations

import csv
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from palmtree import bench, clip_loss, peers

OPEN_CLIP = peers.peer_status("open_clip", "cpu")
needs_open_clip = pytest.mark.skipif(OPEN_CLIP is not None, reason=str(OPEN_CLIP))


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
def test_oracle_matches_autograd(log_scale):
    img, txt = bench.make_inputs(70, 24, seed=1, device="cpu")
    loss, d_img, d_txt, d_scale = _autograd_fp64(img, txt, log_scale)
    got = bench.oracle_fp64(img, txt, log_scale, chunk=16)  # several chunks, one ragged
    torch.testing.assert_close(got["loss"], loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(got["d_img"], d_img, rtol=1e-11, atol=1e-15)
    torch.testing.assert_close(got["d_txt"], d_txt, rtol=1e-11, atol=1e-15)
    torch.testing.assert_close(got["d_scale"], d_scale, rtol=1e-11, atol=1e-15)


def test_inputs_are_correlated_random_pairs():
    img, txt = bench.make_inputs(256, 256, seed=0, device="cpu")
    again, _ = bench.make_inputs(256, 256, seed=0, device="cpu")
    assert torch.equal(img, again)
    cos = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    assert cos.diagonal().min() > 0.3 and cos.fill_diagonal_(0).abs().mean() < 0.1
    loss = float(clip_loss(img, txt, math.log(1 / 0.07)).loss)
    assert 0.05 < loss < math.log(256) / 2  # neither trivial nor uncorrelated


def test_cpu_peak_memory_sees_an_allocation():
    probe = bench._PeakMemory(torch.device("cpu"))
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
    img, txt = bench.make_inputs(96, 40, seed=3, device="cpu")
    grads = []
    for fn in (peers.open_clip_loss, lambda i, t, s: clip_loss(i, t, s, precision="ieee").loss):
        i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
        s = torch.tensor(math.log(1 / 0.07), requires_grad=True)
        loss = fn(i, t, s)
        loss.backward()
        grads.append((loss.detach(), i.grad, t.grad, s.grad))
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-7)


def test_inf_cl_reports_why_it_cannot_run_on_cpu():
    why = peers.peer_status("inf_cl", "cpu")
    assert why is not None and "CUDA" in why


def test_quick_sweep_writes_rows_table_and_plot(tmp_path):
    impl_peers = ["inf_cl"] + (["open_clip"] if OPEN_CLIP is None else [])
    argv = ["--quick", "--device", "cpu", "--out", str(tmp_path), "--name", "t"]
    argv += ["--backends", "reference", "chunked", "--peers", *impl_peers]
    assert bench.main(argv) == 0

    with (tmp_path / "t.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bench.FIELDS
        rows = list(reader)
    impls = ["reference", "chunked", *impl_peers]
    assert sorted((r["impl"], int(r["batch"])) for r in rows) == sorted(
        (impl, b) for impl in impls for b in bench.QUICK["batch_sizes"]
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
    assert (tmp_path / "t.png").stat().st_size > 1000
    table = (tmp_path / "t.md").read_text()
    assert "| chunked | ieee | 128 | 32 |" in table


def test_out_of_memory_is_a_row_not_a_crash():
    # Reference logits for B=4096 need ~0.4 GB; the worker may grow by 64 MB at most.
    case = bench.Case(
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
    result = bench.run_case_in_process(case, timeout=120)
    assert result["status"] == "oom", result


def test_bench_is_a_cli_subcommand(capsys):
    from palmtree import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    assert "--batch-sizes" in capsys.readouterr().out


def test_rounds_pool_timed_runs_and_keep_worst_memory_and_error():
    ok = dict(status="ok", note="", loss=1.0)
    results = [
        dict(ok, times=[10.0, 11.0], peak_mb=5.0, loss_diff=1e-7, grad_diff=1e-6),
        dict(status="error", note="boom"),
        dict(ok, times=[30.0, 12.0], peak_mb=7.0, loss_diff=2e-7, grad_diff=1e-6),
    ]
    row = bench.combine_rounds(results)
    assert row["status"] == "ok" and row["repeats"] == 4
    assert row["median_ms"] == 11.5 and row["min_ms"] == 10.0 and row["peak_mb"] == 7.0
    assert row["loss_diff"] == 2e-7 and "1 of 3 rounds failed" in row["note"]
    assert bench.combine_rounds([dict(status="oom", note="x")])["status"] == "oom"
