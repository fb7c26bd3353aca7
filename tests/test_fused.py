"""The fused Triton kernels against float64, per precision, at odd and adversarial sizes.

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set
here before Triton is imported) at small sizes; with CUDA the same cases run compiled,
plus the ``gpu`` cases at training sizes. Every vector output must satisfy
``max|fused - fp64| <= 2 * max|chunked - fp64| + 1e-6 * max|fp64|``, ``chunked`` with the
same precision being the plain same-dtype PyTorch computation (its worst of four feature
orders, see :func:`worst_naive`); the scalar ``dscale`` is held to the bound of its own
computation (:func:`dscale_bound`), and the loss through ``clip_loss`` to
:mod:`palmtree.testing`'s.
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

from palmtree import clip_loss, testing  # noqa: E402
from palmtree.backends.base import ForwardStats, GradientTerms  # noqa: E402
from palmtree.backends.chunked import ChunkedKernels  # noqa: E402
from palmtree.backends.fused import FusedKernels  # noqa: E402
from palmtree.protocol import pair_dots  # noqa: E402

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


def unit_pairs(big, dim, seed, kind="correlated"):
    img, txt = testing.make_pairs(big, dim, seed, kind=kind)
    u = torch.nn.functional.normalize(img, dim=1)
    v = torch.nn.functional.normalize(txt, dim=1)
    return u, v


def backward_shifts(u, v, scale, offset, seed):
    """Shifts and coefficients as the protocol builds them (per-column weights differ),
    from float64 statistics, and the pairs' similarities: the local rows' own, and each
    other column's largest (a peaked column's positive); the positives (``diag``) come
    from each kernel's forward."""
    g = torch.Generator().manual_seed(seed)
    b, big = u.shape[0], v.shape[0]
    dot = u.double() @ v.double().T
    s = scale.double() * dot
    rows = torch.arange(b)
    pair_dot = dot.amax(0) if b else torch.zeros(big, dtype=torch.float64)
    pair_dot[offset + rows] = dot[rows, offset + rows]
    w_row = torch.full((b,), 0.7, dtype=torch.float64)
    w_col = 0.5 + torch.rand(big, generator=g, dtype=torch.float64)
    row_max, col_max = s.amax(1), s.amax(0)
    e_row, e_col = torch.exp(s - row_max[:, None]), torch.exp(s - col_max)
    row_sum, col_sum = e_row.sum(1), e_col.sum(0)
    e_row[rows, offset + rows] = e_col[rows, offset + rows] = 0.0  # the negatives only
    own = slice(offset, offset + b)
    pos_grad = -(w_row * e_row.sum(1) / row_sum + w_col[own] * e_col.sum(0)[own] / col_sum[own])
    inputs = (row_max, w_row / row_sum, col_max, w_col / col_sum, pos_grad, pair_dot)
    return [t.float() for t in inputs]


def exact(u, v, scale, offset, shifts, precision="ieee"):
    """The base.py contract in float64 with the logits materialised."""
    u, v, scale = u.double(), v.double(), scale.double().to(u.device)
    b = u.shape[0]
    s = scale * u @ v.T
    rows = torch.arange(b, device=u.device)
    out = dict(row_max=s.amax(1), col_max=s.amax(0), diag=s[rows, offset + rows])
    e_row = torch.exp(s - out["row_max"][:, None])
    e_col = torch.exp(s - out["col_max"])
    e_row[rows, offset + rows] = e_col[rows, offset + rows] = 0.0  # the negatives only
    out["row_neg"], out["col_neg"] = e_row.sum(1), e_col.sum(0)
    row_shift, row_coef, col_shift, col_coef, pos, pair = (t.to(u.device).double() for t in shifts)
    p_row = row_coef[:, None] * torch.exp(s - row_shift[:, None])
    p_col = col_coef * torch.exp(s - col_shift)
    g = p_row + p_col
    g[rows, offset + rows] = pos
    # base.py's dscale: each similarity against its row's and its column's pair, the
    # positives' terms left out.
    dot = u @ v.T
    sides = [(p_row, dot - pair[offset + rows, None]), (p_col, dot - pair[None, :])]
    for p, _ in sides:
        p[rows, offset + rows] = 0.0  # g already holds the positives' probabilities
    out.update(du=scale * g @ v, dv=scale * g.T @ u)
    out["dscale"] = sum((p * diff).sum() for p, diff in sides)
    out["dscale_bound"] = dscale_bound(u, v, scale, sides, precision)
    return out


#: Relative rounding of one matmul operand per precision mode.
OPERAND_UNIT = {"ieee": 0.0, "tf32": 2.0**-11, "bf16": 2.0**-8}


def dscale_bound(u, v, scale, sides, precision) -> float:
    """Bound on fp32's ``dscale`` (base.py) for given fp32 shifts, coefficients and pair
    similarities (exact inputs here); ``sides`` are the rows' and the columns'
    ``(coef * exp(S - shift), dot - pair)``, 0 at the positives.

    Each product ``U V^T`` is off by ``(gamma(D) + 2.01 unit) |U| |V|^T`` (``unit`` the
    operands' rounding in tf32/bf16 modes, 0 in ieee), so each logit by ``scale``
    times that plus the rounding of the scale and of ``S - shift`` (``gamma(3) 2 s``);
    each ``coef * exp(S - shift)`` moves by itself times that logit error, plus
    ``gamma(3)`` relative for ``exp`` and the product; each difference by the product's
    error and its own rounding; each term rounds twice more (``gamma(2)``), and the sum
    adds ``gamma(b + B + 2)`` times the terms' absolute sum (:mod:`palmtree.testing`
    counts sums so).
    """
    dim = u.shape[1]
    e_dot = (testing.gamma(dim) + 2.01 * OPERAND_UNIT[precision]) * (u.abs() @ v.abs().T)
    e_s = float(scale) * (e_dot + testing.gamma(3) * 2)
    n = u.shape[0] + v.shape[0] + 2
    err = 0.0
    for p, diff in sides:
        t = (p * diff).abs()
        moved = p * (e_s + testing.gamma(3)) * diff.abs() + p * e_dot
        moved += p * testing.UNIT_ROUNDOFF * diff.abs() + testing.gamma(2) * t
        err += float(moved.sum()) + testing.gamma(n) * float(t.sum())
    return err


def gradient_terms(shifts, diag) -> GradientTerms:
    """:func:`backward_shifts`' outputs and a forward's positives as the backward's input."""
    *coefs, pair_dot = shifts
    return GradientTerms(*coefs, diag=diag, pair_dot=pair_dot)


def run(kernels, u, v, scale, offset, precision, shifts):
    stats = kernels.forward(u, v, scale, offset, precision, None)
    terms = gradient_terms(shifts, stats.diag)
    grads = kernels.backward(u, v, scale, offset, precision, None, terms)
    out = {name: getattr(stats, name) for name in STATS}
    out.update(zip(GRADS, grads, strict=True))
    return out


def worst_naive(u, v, scale, offset, precision, shifts, want, orders=4):
    """``chunked`` outputs, each the worst of ``orders`` summation orders of the features
    (:func:`palmtree.testing.worst_of_orders`), on the CPU."""

    def chunked(a, b):
        return run(ChunkedKernels(), a, b, scale, offset, precision, shifts)

    worst = testing.worst_of_orders(chunked, u, v, want, orders, feature_keys=("du", "dv"))
    return {name: t.cpu() for name, t in worst.items()}


def rel_err(ours, ref) -> float:
    return float((ours.double() - ref.cpu()).abs().max() / ref.abs().max().clamp_min(1e-30))


def check_against_fp64(u, v, scale, offset, precision, fused=None, seed=0):
    """Asserts the rules on every output; returns the fused relative errors for the record."""
    fused = fused or FusedKernels()
    dev = dict(device=DEVICE)
    shifts = backward_shifts(u, v, scale, offset, seed)
    want = exact(u.to(**dev), v.to(**dev), scale, offset, shifts, precision)
    bound = want.pop("dscale_bound")
    want = {k: t.cpu() for k, t in want.items()}
    args = (u.to(**dev), v.to(**dev), scale.to(**dev), offset, precision)
    shifts = [t.to(**dev) for t in shifts]
    ours = run(fused, *args, shifts)
    naive = worst_naive(*args, shifts, want)
    for name, ref in want.items():
        assert ours[name].dtype == torch.float32, name
        assert ours[name].shape == ref.shape, name
        if name == "dscale":
            testing.check_scalar(f"{precision} {name}", ours[name].cpu(), ref, bound)
        else:
            testing.check_tensor(f"{precision} {name}", ours[name].cpu(), naive[name], ref)
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
    u, v = unit_pairs(150, 40, seed=5, kind="adversarial")
    assert (u @ v.T).max() < -0.9
    scale = torch.tensor(100.0)
    fused = FusedKernels(**PLANS[plan])
    check_against_fp64(u[:67], v, scale, 0, precision, fused)
    stats = fused.forward(u[:67].to(DEVICE), v.to(DEVICE), scale.to(DEVICE), 0, precision, None)
    s = 100.0 * u[:67].double() @ v.double().T
    col_sum = stats.col_neg.clone()
    col_sum[:67] += torch.exp(stats.diag - stats.col_max[:67])
    col_lse = (stats.col_max + torch.log(col_sum)).cpu()
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
    assert stats.row_max.shape == stats.row_neg.shape == stats.diag.shape == (0,)
    assert torch.equal(stats.col_max.cpu(), torch.full((150,), -math.inf))
    assert torch.equal(stats.col_neg.cpu(), torch.zeros(150))
    empty = torch.empty(0, **dev)
    col = torch.zeros(150, **dev)
    terms = GradientTerms(empty, empty, col, col, empty, empty, col)
    du, dv, ds = fused.backward(u, v, scale, 0, "ieee", None, terms)
    assert du.shape == (0, 40) and torch.equal(dv.cpu(), torch.zeros(150, 40))
    assert ds.shape == () and float(ds) == 0.0


def test_strided_coefficients_and_scale_stays_on_device():
    u, v = unit_pairs(150, 40, seed=8)
    u = u[:67]
    scale = torch.tensor(20.0)
    shifts = backward_shifts(u, v, scale, 0, seed=8)
    # The protocol hands in expanded or sliced views: the kernels must not read past them.
    shifts[1] = torch.stack([shifts[1], torch.full_like(shifts[1], 1e6)], 1)[:, 0]
    want = exact(u, v, scale, 0, shifts)
    dev = [t.to(DEVICE) for t in shifts]
    fused = FusedKernels()
    uu, vv, ss = u.to(DEVICE), v.to(DEVICE), scale.to(DEVICE)
    diag = fused.forward(uu, vv, ss, 0, "ieee", None).diag
    du, dv, ds = fused.backward(uu, vv, ss, 0, "ieee", None, gradient_terms(dev, diag))
    assert ds.device.type == DEVICE
    assert rel_err(du.cpu(), want["du"]) < 1e-5 and rel_err(dv.cpu(), want["dv"]) < 1e-5


def emulated_ranks(kernels, u, v, scale, sizes, precision):
    """The protocol's forward and backward over ``sizes`` ranks, in one process.

    Every rank's kernels see only its rows; the column statistics are merged as the
    all-reduces would, so a column's maximum and sums come from other "ranks'" tiles
    while its positive was computed by its owner. All upstream weights are 1.
    """
    big = v.shape[0]
    stats, offsets = [], [sum(sizes[:r]) for r in range(len(sizes))]
    pair_dot = []  # each "rank" its own pairs'; the forward's SUM all-reduce joins them
    for o, b in zip(offsets, sizes, strict=True):
        stats.append(kernels.forward(u[o : o + b], v, scale, o, precision, 5))
        pair_dot.append(pair_dots(u[o : o + b], v[o : o + b], precision))
    pair_dot = torch.cat(pair_dot)
    col_max = torch.stack([st.col_max for st in stats]).amax(0)
    col_sum, col_neg = torch.zeros_like(col_max), torch.zeros_like(col_max)
    for o, b, st in zip(offsets, sizes, stats, strict=True):
        full = st.col_neg.clone()
        full[o : o + b] += torch.exp(st.diag - st.col_max[o : o + b])
        col_sum += full * torch.exp(st.col_max - col_max)
        col_neg += st.col_neg * torch.exp(st.col_max - col_max)
    w = 1.0 / (2 * big)
    du, dv, dscale = [], torch.zeros_like(v), 0.0
    for o, b, st in zip(offsets, sizes, stats, strict=True):
        own = slice(o, o + b)  # G at the positives as the protocol forms it (clip_terms)
        pos_grad = -(w / st.row_sum * st.row_neg + w / col_sum[own] * col_neg[own])
        coefs = (st.row_max, w / st.row_sum, col_max, w / col_sum, pos_grad)
        terms = GradientTerms(*coefs, diag=st.diag, pair_dot=pair_dot)
        grads = kernels.backward(u[o : o + b], v, scale, o, precision, 5, terms)
        du.append(grads[0])
        dv += grads[1]
        dscale += grads[2]
    return torch.cat(du), dv, dscale


#: Splits of a global batch over emulated ranks: small blocks, uneven, empty ranks.
RANK_SPLITS = [[0, 6, 0, 2], [8, 8], [10, 3, 0, 27]]


@pytest.mark.parametrize("kind", ["aligned", "adversarial"])
@pytest.mark.parametrize("plan", ["default", "split", "atomic"])
@pytest.mark.parametrize("sizes", RANK_SPLITS, ids=str)
def test_every_pass_at_the_cap_across_ranks(kind, plan, sizes):
    """Rows, columns (both launches) and atomic mode, s = 100, uneven ranks: a peaked
    softmax (its positives' ``p - 1`` cancel) and duplicated pairs, ieee, vs float64.

    The column programs must build each positive's ``G`` from the owner's forward logit:
    a recomputed one rounded differently leaves ``eps * scale`` where the truth is ~0.
    ``dscale`` (the loss is ~1e-20 for the aligned pairs) must keep its digits, with its
    columns' positives on other ranks.
    """
    u, v = unit_pairs(sum(sizes), 16, seed=7, kind=kind)
    u, v = u.to(DEVICE), v.to(DEVICE)
    scale = torch.tensor(100.0, device=DEVICE)
    exact_g = _exact_clip_gradients(u, v, 100.0)
    ours = emulated_ranks(FusedKernels(**PLANS[plan]), u, v, scale, sizes, "ieee")
    plain = emulated_ranks(ChunkedKernels(), u, v, scale, sizes, "ieee")
    for name, k in (("du", 0), ("dv", 1)):
        testing.check_tensor(f"{plan} {name}", ours[k].cpu(), plain[k].cpu(), exact_g[k])
    for name, result in (("fused", ours), ("chunked", plain)):
        testing.check_scalar(f"{plan} {name} dscale", result[2].cpu(), *exact_g[2:])


def _exact_clip_gradients(u, v, scale):
    """float64 ``dL/dU``, ``dL/dV`` and ``dL/ds`` of the CLIP loss on unit rows (no
    normalisation), and the bound on fp32's ``dL/ds``."""
    ref = testing.clip_truth(
        u.cpu(), v.cpu(), math.log(scale), normalize=False, scale_cap="straight_through"
    )
    raw = math.exp(math.log(scale))  # d/dlog(s) = raw * dL/ds
    return ref.d_img, ref.d_txt, ref.d_scale / raw, ref.d_scale_bound / raw


def test_the_positives_gradient_does_not_read_a_recomputed_logit():
    """``G`` at a positive is the protocol's ``pos_grad`` (formed from the forward's sums,
    ``1 - p = neg / sum``): a positive logit one ulp away from the forward's (what a
    differently rounded recompute gives) leaves every gradient bit for bit as it was,
    in chunked and in fused alike. (Formed from the tile's ``p - w``, it would move by
    ``w * eps * scale`` where the truth is ~0.)"""
    u, v = (x.to(DEVICE) for x in unit_pairs(67, 24, seed=12, kind="aligned"))
    scale = torch.tensor(100.0, device=DEVICE)
    w = 1.0 / (2 * 67)
    for kernels in (ChunkedKernels(), FusedKernels()):
        st = kernels.forward(u, v, scale, 0, "ieee", None)
        col_sum = st.col_neg + torch.exp(st.diag - st.col_max)
        pos_grad = -(w / st.row_sum * st.row_neg + w / col_sum * st.col_neg)
        coefs = (st.row_max, w / st.row_sum, st.col_max, w / col_sum, pos_grad)
        nudged = torch.nextafter(st.diag, torch.full_like(st.diag, math.inf))
        grads = []
        for diag in (st.diag, nudged):
            terms = GradientTerms(*coefs, diag, pair_dots(u, v, "ieee"))
            grads.append(kernels.backward(u, v, scale, 0, "ieee", None, terms))
        for a, b in zip(*grads, strict=True):
            assert torch.equal(a, b), kernels.name


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
    img, txt = testing.make_pairs(37, 24, seed=9)
    log_scale = math.log(20.0)
    results = {}
    for backend in ("fused", "chunked"):
        i = img.to(DEVICE).requires_grad_()
        t = txt.to(DEVICE).requires_grad_()
        ls = torch.tensor(log_scale, device=DEVICE, requires_grad=True)
        out = clip_loss(i, t, ls, backend=backend, precision=precision)
        out.loss.backward()
        results[backend] = (out.loss.detach(), i.grad, t.grad, ls.grad)
    want = testing.clip_truth(img, txt, log_scale)
    fused, chunked = ([x.cpu() for x in results[b]] for b in ("fused", "chunked"))
    for k, name in ((1, "d_img"), (2, "d_txt")):
        testing.check_tensor(f"{precision} {name}", fused[k], chunked[k], getattr(want, name))
    if precision == "ieee":
        testing.check_scalar("loss", fused[0], want.loss, want.loss_bound)
        testing.check_scalar("d_scale", fused[3], want.d_scale, want.d_scale_bound)
    else:  # rounded operands: the same rounding as chunked's, only the sums' order differs
        for k, name in ((0, "loss"), (3, "d_scale")):
            testing.check_tensor(f"{precision} {name}", fused[k], chunked[k], getattr(want, name))


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_text_negatives_with_the_fused_backend(loss):
    """Extra negative columns: the fused kernels see ``B + N`` columns; the loss and every
    gradient (the negatives' too) against float64, tensors within 2x plain fp32."""
    from palmtree import siglip_loss

    img, txt = testing.make_pairs(13, 16, seed=2)
    negs = testing.make_pairs(6, 16, seed=3)[1]
    leaves = [x.to(DEVICE).requires_grad_() for x in (img, txt, negs)]
    ls = torch.tensor(2.5, device=DEVICE, requires_grad=True)
    if loss == "clip":
        out = clip_loss(*leaves[:2], ls, text_negatives=leaves[2], backend="fused")
        want = testing.clip_truth(img, txt, 2.5, negatives=negs)
        plain = testing.plain_fp32(img, txt, 2.5, negatives=negs)
    else:
        kw = dict(text_negatives=leaves[2], backend="fused")
        out = siglip_loss(*leaves[:2], ls, -1.0, **kw)
        want = testing.siglip_truth(img, txt, 2.5, -1.0, negatives=negs)
        plain = testing.plain_fp32_siglip(img, txt, 2.5, -1.0, negatives=negs)
    out.loss.backward()
    testing.check_scalar("loss", out.loss.cpu(), want.loss, want.loss_bound)
    testing.check_scalar("d_scale", ls.grad.cpu(), want.d_scale, want.d_scale_bound)
    for leaf, name in zip(leaves, ("d_img", "d_txt", "d_neg"), strict=True):
        testing.check_tensor(name, leaf.grad.cpu(), plain[name], getattr(want, name))


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
    u, v = unit_pairs(4096, 512, seed=11, kind="adversarial")
    check_against_fp64(u, v, torch.tensor(100.0), 0, precision)


@pytest.mark.parametrize("plan", ["split", "atomic-split"])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("mode", ["positive", "ignore"])
def test_labels_across_tiles_splits_and_segments(plan, loss, mode, monkeypatch):
    """Same-item labels compared per tile: 67 pairs (3 row blocks of 32), 11 extra
    negatives, five items spread over every tile, with the plan forcing K chunks, column
    splits and column segments (and atomic dV)."""
    labels = (torch.arange(67) * 7) % 5 - 2
    check_labels(FusedKernels(**PLANS[plan]), loss, mode, labels, 11, 16, monkeypatch)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("mode", ["positive", "ignore"])
def test_labels_at_training_size_on_cuda(loss, mode, monkeypatch):
    """The compiled labelled variants with the card's plan: 4096 pairs of 1000 items
    (most with several pairs, across every tile), 512 hard negatives, D = 512."""
    labels = torch.randint(0, 1000, (4096,), generator=torch.Generator().manual_seed(3))
    check_labels(FusedKernels(), loss, mode, labels, 512, 512, monkeypatch)


def check_labels(kernels, loss, mode, labels, n_neg, dim, monkeypatch):
    """``clip_loss``/``siglip_loss`` with ``labels`` and ``n_neg`` extra negatives through
    ``kernels``: the loss and the scalars against float64 within their bounds; each
    tensor within 2x the larger of plain fp32's and chunked's error (the module
    docstring's rule), chunked's within 2x plain's."""
    import palmtree.backends.fused as fused_module
    from palmtree import siglip_loss

    monkeypatch.setattr(fused_module, "FusedKernels", lambda: kernels)
    img, txt = testing.make_pairs(len(labels), dim, seed=4)
    negs = testing.make_pairs(n_neg, dim, seed=5)[1]
    truth_kw = dict(negatives=negs, labels=labels, same_label=mode)
    if loss == "clip":
        want = testing.clip_truth(img, txt, 2.5, **truth_kw)
        plain = testing.plain_fp32(img, txt, 2.5, **truth_kw)
    else:
        want = testing.siglip_truth(img, txt, 2.5, -1.0, **truth_kw)
        plain = testing.plain_fp32_siglip(img, txt, 2.5, -1.0, **truth_kw)
    grads = {}
    for backend in ("fused", "chunked"):
        leaves = [x.clone().to(DEVICE).requires_grad_() for x in (img, txt, negs)]
        ls = torch.tensor(2.5, device=DEVICE, requires_grad=True)
        call = dict(labels=labels.to(DEVICE), same_label=mode, backend=backend)
        call["text_negatives"] = leaves[2]
        if loss == "clip":
            out = clip_loss(*leaves[:2], ls, **call)
        else:
            out = siglip_loss(*leaves[:2], ls, -1.0, **call)
        out.loss.backward()
        grads[backend] = [leaf.grad.detach().cpu() for leaf in leaves]
        if backend == "fused":
            testing.check_scalar("loss", out.loss.cpu(), want.loss, want.loss_bound)
            testing.check_scalar("d_scale", ls.grad.cpu(), want.d_scale, want.d_scale_bound)
    for k, name in enumerate(("d_img", "d_txt", "d_neg")):
        exact = getattr(want, name)
        testing.check_tensor(f"chunked {name}", grads["chunked"][k], plain[name], exact)
        like = max(plain[name], grads["chunked"][k], key=lambda x: testing.max_error(x, exact))
        testing.check_tensor(f"fused {name}", grads["fused"][k], like, exact)
