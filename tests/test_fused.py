"""The fused Triton kernels against float64, per precision, at odd and adversarial sizes.

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set
here before Triton is imported) at small sizes; with CUDA the same cases run compiled,
plus the ``gpu`` cases at training sizes. Every output must satisfy the project's rule
``|fused - fp64| <= 2 * |chunked - fp64| + 1e-6 * max|fp64|``, ``chunked`` with the same
precision being the plain same-dtype PyTorch computation (its worst of four feature
orders, see :func:`worst_naive`).
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from oracle import assert_close_to_truth, make_batch, truth  # noqa: E402

from palmtree import clip_loss  # noqa: E402
from palmtree.backends.base import ForwardStats  # noqa: E402
from palmtree.backends.chunked import ChunkedKernels  # noqa: E402
from palmtree.backends.fused import FusedKernels  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
PRECISIONS = ("ieee", "tf32", "bf16")
STATS = [f.name for f in dataclasses.fields(ForwardStats)]
GRADS = ("du", "dv", "dscale")
# The default interpreter plan keeps D whole and runs one program per block; "split"
# forces the other paths on small problems: D in 16-wide chunks, split columns (summed
# partials), column segments of 32 (b = 67 -> 3 row blocks of 32 -> 5 forward launches
# at B = 150). "atomic" is the single-launch backward with atomic dV.
SPLIT = dict(block_k=16, bwd_block_k=16, target_programs=12, partials_budget=3 * 8 * 32)
PLANS = {
    "default": {},
    "split": SPLIT,
    "atomic": dict(bwd_mode="atomic"),
    "atomic-split": dict(SPLIT, bwd_mode="atomic"),
}


def unit_pairs(big, dim, seed, noise=0.7):
    img, txt = make_batch(big, dim, seed, noise=noise)
    u = torch.nn.functional.normalize(img, dim=1)
    v = torch.nn.functional.normalize(txt, dim=1)
    return u, v


def backward_inputs(u, v, scale, offset, seed):
    """Shifts and coefficients as the protocol builds them (per-column weights differ)."""
    g = torch.Generator().manual_seed(seed)
    b, big = u.shape[0], v.shape[0]
    s = scale.double() * u.double() @ v.double().T
    w_row = torch.full((b,), 0.7, dtype=torch.float64)
    w_col = 0.5 + torch.rand(big, generator=g, dtype=torch.float64)
    row_max, col_max = s.amax(1), s.amax(0)
    row_sum = torch.exp(s - row_max[:, None]).sum(1)
    col_sum = torch.exp(s - col_max).sum(0)
    inputs = (
        row_max,
        w_row / row_sum,
        col_max,
        w_col / col_sum,
        w_row + w_col[offset : offset + b],
    )
    return [t.float() for t in inputs]


def exact(u, v, scale, offset, bwd_inputs):
    """The base.py contract in float64 with the logits materialised."""
    u, v, scale = u.double(), v.double(), scale.double().to(u.device)
    b = u.shape[0]
    s = scale * u @ v.T
    rows = torch.arange(b, device=u.device)
    out = dict(row_max=s.amax(1), col_max=s.amax(0), diag=s[rows, offset + rows])
    out["row_sum"] = torch.exp(s - out["row_max"][:, None]).sum(1)
    out["col_sum"] = torch.exp(s - out["col_max"]).sum(0)
    row_shift, row_coef, col_shift, col_coef, pos = (t.to(u.device).double() for t in bwd_inputs)
    g = row_coef[:, None] * torch.exp(s - row_shift[:, None]) + col_coef * torch.exp(s - col_shift)
    g[rows, offset + rows] -= pos
    out.update(du=scale * g @ v, dv=scale * g.T @ u, dscale=(g * s).sum() / scale)
    return out


def run(kernels, u, v, scale, offset, precision, bwd_inputs):
    stats = kernels.forward(u, v, scale, offset, precision, None)
    grads = kernels.backward(u, v, scale, offset, precision, None, *bwd_inputs)
    out = {name: getattr(stats, name) for name in STATS}
    out.update(zip(GRADS, grads, strict=True))
    return out


def worst_naive(u, v, scale, offset, precision, bwd_inputs, want, orders=4):
    """``chunked`` outputs, each the worst of ``orders`` summation orders of the features.

    Permuting the feature dimension of both sides leaves the math unchanged and gives
    another, equally valid fp32 summation order. One order's error is a single sample
    (a scalar like ``dscale`` is sometimes far more exact than typical by luck); the
    worst of a few is what the same-dtype computation can be relied on to achieve.
    """
    g = torch.Generator().manual_seed(123)
    worst = {}
    for k in range(orders):
        perm = torch.arange(u.shape[1]) if k == 0 else torch.randperm(u.shape[1], generator=g)
        perm = perm.to(u.device)
        out = run(ChunkedKernels(), u[:, perm], v[:, perm], scale, offset, precision, bwd_inputs)
        inv = torch.argsort(perm)
        out["du"], out["dv"] = out["du"][:, inv], out["dv"][:, inv]
        for name, ref in want.items():
            err = float((out[name].double().cpu() - ref).abs().max()) if ref.numel() else 0.0
            if name not in worst or err > worst[name][0]:
                worst[name] = (err, out[name].cpu())
    return {name: t for name, (_, t) in worst.items()}


def rel_err(ours, ref) -> float:
    return float((ours.double() - ref.cpu()).abs().max() / ref.abs().max().clamp_min(1e-30))


def check_against_fp64(u, v, scale, offset, precision, fused=None, seed=0):
    """Asserts the 2x rule on every output; returns the fused relative errors for the record."""
    fused = fused or FusedKernels()
    dev = dict(device=DEVICE)
    bwd = backward_inputs(u, v, scale, offset, seed)
    want = {k: t.cpu() for k, t in exact(u.to(**dev), v.to(**dev), scale, offset, bwd).items()}
    args = (u.to(**dev), v.to(**dev), scale.to(**dev), offset, precision)
    bwd = [t.to(**dev) for t in bwd]
    ours = run(fused, *args, bwd)
    naive = worst_naive(*args, bwd, want)
    for name, ref in want.items():
        assert ours[name].dtype == torch.float32, name
        assert ours[name].shape == ref.shape, name
        assert_close_to_truth(f"{precision} {name}", ours[name].cpu(), naive[name], ref)
    return {name: rel_err(ours[name].cpu(), ref) for name, ref in want.items()}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("plan", PLANS)
def test_odd_sizes_offset_in_the_middle(precision, plan):
    u, v = unit_pairs(150, 40, seed=1)
    fused = FusedKernels(**PLANS[plan])
    check_against_fp64(u[50:117], v, torch.tensor(20.0), 50, precision, fused)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_single_row_whose_positive_is_the_last_column(precision):
    u, v = unit_pairs(150, 40, seed=2)
    check_against_fp64(u[149:], v, torch.tensor(14.3), 149, precision)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_all_rows_tiny_dim(precision):
    u, v = unit_pairs(150, 3, seed=3)
    check_against_fp64(u, v, torch.tensor(30.0), 0, precision)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_large_dim_not_a_power_of_two(precision):
    u, v = unit_pairs(45, 1030, seed=4)
    check_against_fp64(u[25:], v, torch.tensor(50.0), 25, precision, FusedKernels(block_k=256))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("plan", ["default", "atomic-split"])
def test_all_similarities_near_minus_one_at_the_cap(precision, plan):
    # Every logit sits near -100 and pairs 0 and 1 are duplicates: a fixed shift at the
    # cap would underflow every column to exp(-200) = 0.
    u, v = unit_pairs(150, 40, seed=5, noise=-1.0)
    assert (u @ v.T).max() < -0.9
    scale = torch.tensor(100.0)
    fused = FusedKernels(**PLANS[plan])
    check_against_fp64(u[:67], v, scale, 0, precision, fused)
    stats = fused.forward(u[:67].to(DEVICE), v.to(DEVICE), scale.to(DEVICE), 0, precision, None)
    s = 100.0 * u[:67].double() @ v.double().T
    col_lse = (stats.col_max + torch.log(stats.col_sum)).cpu()
    row_lse = (stats.row_max + torch.log(stats.row_sum)).cpu()
    tol = 1e-6 * 100 if precision == "ieee" else 1.0  # bf16/tf32: operand rounding only
    assert torch.isfinite(col_lse).all() and torch.isfinite(row_lse).all()
    assert (col_lse - torch.logsumexp(s, 0)).abs().max() < tol
    assert (row_lse - torch.logsumexp(s, 1)).abs().max() < tol


@pytest.mark.parametrize("precision", PRECISIONS)
def test_one_dominating_entry_per_row(precision):
    u, _ = unit_pairs(150, 40, seed=6)
    check_against_fp64(u[30:97], u, torch.tensor(100.0), 30, precision)


def test_empty_rank():
    u, v = unit_pairs(150, 40, seed=7)
    dev = dict(device=DEVICE)
    u, v, scale = u[:0].to(**dev), v.to(**dev), torch.tensor(20.0, **dev)
    fused = FusedKernels()
    stats = fused.forward(u, v, scale, 0, "ieee", None)
    assert stats.row_max.shape == stats.row_sum.shape == stats.diag.shape == (0,)
    assert torch.equal(stats.col_max.cpu(), torch.full((150,), -math.inf))
    assert torch.equal(stats.col_sum.cpu(), torch.zeros(150))
    empty = torch.empty(0, **dev)
    col = torch.zeros(150, **dev)
    du, dv, ds = fused.backward(u, v, scale, 0, "ieee", None, empty, empty, col, col, empty)
    assert du.shape == (0, 40) and torch.equal(dv.cpu(), torch.zeros(150, 40))
    assert ds.shape == () and float(ds) == 0.0


def test_strided_coefficients_and_scale_stays_on_device():
    u, v = unit_pairs(150, 40, seed=8)
    u = u[:67]
    scale = torch.tensor(20.0)
    bwd = backward_inputs(u, v, scale, 0, seed=8)
    # The protocol hands in expanded or sliced views: the kernels must not read past them.
    bwd[1] = torch.stack([bwd[1], torch.full_like(bwd[1], 1e6)], 1)[:, 0]
    want = exact(u, v, scale, 0, bwd)
    dev = [t.to(DEVICE) for t in bwd]
    du, dv, ds = FusedKernels().backward(
        u.to(DEVICE), v.to(DEVICE), scale.to(DEVICE), 0, "ieee", None, *dev
    )
    assert ds.device.type == DEVICE
    assert rel_err(du.cpu(), want["du"]) < 1e-5 and rel_err(dv.cpu(), want["dv"]) < 1e-5


def test_bad_inputs_are_rejected():
    fused = FusedKernels()
    u, v, scale = torch.zeros(4, 8), torch.zeros(6, 8), torch.tensor(1.0)
    with pytest.raises(ValueError, match="offset"):
        fused.forward(u, v, scale, 3, "ieee", None)
    with pytest.raises(ValueError, match="precision"):
        fused.forward(u, v, scale, 0, "fp8", None)
    with pytest.raises(TypeError, match="fp32"):
        fused.forward(u.double(), v, scale, 0, "ieee", None)
    with pytest.raises(ValueError, match="D"):
        fused.forward(u, v[:, :4], scale, 0, "ieee", None)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_clip_loss_with_the_fused_backend(precision):
    img, txt = make_batch(37, 24, seed=9)
    want = truth(img, txt, math.log(20.0), [37])
    results = {}
    for backend in ("fused", "chunked"):
        i = img.to(DEVICE).requires_grad_()
        t = txt.to(DEVICE).requires_grad_()
        ls = torch.tensor(math.log(20.0), device=DEVICE, requires_grad=True)
        out = clip_loss(i, t, ls, backend=backend, precision=precision)
        out.loss.backward()
        results[backend] = (out.loss.detach(), i.grad, t.grad, ls.grad)
    for k, name in enumerate(("loss", "d_img", "d_txt", "d_scale")):
        ours, naive = (results[b][k].cpu() for b in ("fused", "chunked"))
        assert_close_to_truth(f"{precision} {name}", ours, naive, want[name])


needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA (compiled kernels)")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("plan", ["default", "atomic"])
@pytest.mark.parametrize(
    "b, big, dim, offset",
    [(4096, 4096, 512, 0), (1000, 8192, 512, 3000), (2048, 2048, 1024, 0), (777, 3001, 200, 1)],
)
def test_training_sizes_on_cuda(precision, plan, b, big, dim, offset):
    u, v = unit_pairs(big, dim, seed=10)
    fused = FusedKernels(**PLANS[plan])
    errs = check_against_fp64(
        u[offset : offset + b], v, torch.tensor(100.0), offset, precision, fused
    )
    print(precision, b, big, dim, errs)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", PRECISIONS)
def test_adversarial_at_training_size_on_cuda(precision):
    u, v = unit_pairs(4096, 512, seed=11, noise=-1.0)
    check_against_fp64(u, v, torch.tensor(100.0), 0, precision)
