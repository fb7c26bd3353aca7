"""Ground truth for contrastive losses: seeded pairs, a float64 reference, error bounds.

What palmtree's own tests, ``palmtree verify`` and ``palmtree bench`` check against, and
what you can call in your own tests::

    from palmtree import clip_loss, testing

    img, txt = testing.make_pairs(512, 64, seed=0)
    ref = testing.reference(img, txt, logit_scale=2.3)
    out = clip_loss(img, txt, torch.tensor(2.3))
    testing.check_scalar("loss", out.loss, ref.loss, ref.loss_bound)

How close an fp32 result must be (docs/design.md, "What exact means"):

* **Scalars that are sums** (the loss, each rank's share, the temperature's gradient)
  must lie within a bound derived from the computation itself, here, in float64, from
  first-order error analysis: every fp32 logit is off by at most
  ``E_ij = s * (gamma(2D + 4) * sum_k |u_ik v_jk| + gamma(5))`` (normalisation, the
  ``D``-term dot product, the scale and the shift before ``exp``; ``gamma(n) = n u /
  (1 - n u)``, ``u = 2**-24``), each loss term ``t = -log p_positive`` moves by at most
  ``sum_j |p_j - [j = positive]| E_j`` under those errors and is formed to
  ``gamma(3B + 3)`` relative, and sums of ``n`` terms add ``gamma(n)`` times the sum of
  their absolute values (each operation may also lose ``2**-149`` to underflow). The
  bound is relative to the loss (no absolute allowance above fp32's underflow), so a
  small loss must keep its digits too. It is a worst case, not a typical error:
  correct fp32 code sits far inside it; the defects it exists for (an ``lse - logit``
  cancelling at magnitude ``scale``) leave it by orders of magnitude. The CLIP
  temperature's gradient is formed, here as in the backends, from each similarity's
  difference to its row's and its column's positive (:mod:`palmtree.backends.base`),
  and bounded as formed: at a peaked softmax that too is relative to the value, which
  ``sum G * (U V^T)``, cancelling to ``eps / loss``, is not.
* **Gradient tensors** must be within ``2 x`` the error of a plain fp32 computation of
  the same gradient (materialised logits, autograd), plus ``1e-6`` of their largest
  entry: :func:`check_tensor`. This is the maximum over many entries, each carrying the
  rounding of its logits; a correct implementation has the same error distribution
  as the plain one, so its maximum lies within a small factor of the plain maximum.
  It catches gradients normalised inconsistently (a positive's ``p - 1`` left with
  ``eps * scale`` of error where the truth is ~0) by orders of magnitude. Where the
  truth is exactly 0 (raw-feature gradients at ``D = 1``) the ``1e-6`` is of a ``size``
  given instead: :func:`tensor_bound`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

UNIT_ROUNDOFF = 2.0**-24  # fp32
#: Absolute error of an fp32 result that underflows (the spacing of the subnormals):
#: each elementary operation may add this on top of its relative error.
UNDERFLOW = 2.0**-149

KINDS = ("correlated", "adversarial", "aligned")

#: Relative rounding of one matmul operand in each precision mode (tf32 keeps 10 mantissa
#: bits, bf16 7; ieee operands are exact).
OPERAND_UNIT = {"ieee": 0.0, "tf32": 2.0**-11, "bf16": 2.0**-8}


def gamma(n: float, u: float = UNIT_ROUNDOFF) -> float:
    """``n u / (1 - n u)``: the relative error bound of ``n`` rounded operations."""
    return n * u / (1 - n * u)


def make_pairs(
    B: int,
    dim: int,
    seed: int = 0,
    *,
    kind: str = "correlated",
    noise: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``B`` seeded (image, text) feature pairs, the same on every machine and rank.

    ``"correlated"``: texts are their images plus noise (0.7 by default), images have a
    realistic spread of norms (unnormalised). ``"aligned"``: noise 0.05, so at a large
    scale every softmax is peaked on its positive and the loss is small.
    ``"adversarial"``: every similarity near -1 (at scale 100 every logit sits near
    -100, where a fixed max-shift underflows) and the first two pairs duplicated.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    if kind == "adversarial":
        e = torch.randn(dim, **f64)
        img = e + 0.05 * torch.randn(B, dim, **f64)
        txt = -e + 0.05 * torch.randn(B, dim, **f64)
        if B >= 2:
            img[1], txt[1] = img[0], txt[0]
        return img.to(dtype), txt.to(dtype)
    noise = (0.7 if kind == "correlated" else 0.05) if noise is None else noise
    base = torch.randn(B, dim, **f64)
    img = base * (1 + torch.rand(B, 1, **f64))
    txt = base + noise * torch.randn(B, dim, **f64)
    return img.to(dtype), txt.to(dtype)


@dataclass
class Reference:
    """The float64 truth of ``J = sum_r weights[r] * share_r`` and bounds for fp32 results.

    ``loss`` is the global loss (the shares' sum), ``shares[r]`` rank ``r``'s part of it
    (what rank ``r`` returns is ``N * shares[r]``), ``d_img``/``d_txt``/``d_scale`` the
    gradients of ``J`` w.r.t. the raw features and the *log* scale. ``*_bound`` bound the
    error of an fp32 computation of the same value (module docstring). ``d_img_size`` and
    ``d_txt_size`` are the largest entries of the raw-feature gradients before the
    normalisation's projection removes each row's radial part (:func:`tensor_bound`'s
    ``size``): at ``D = 1`` it removes everything, the truth is 0 and an fp32 gradient is
    only that projection's rounding, a few ulps of this size.
    """

    loss: torch.Tensor
    loss_i2t: torch.Tensor
    loss_t2i: torch.Tensor
    shares: torch.Tensor
    d_img: torch.Tensor
    d_txt: torch.Tensor
    d_scale: torch.Tensor
    loss_bound: float
    share_bounds: torch.Tensor
    d_scale_bound: float
    d_img_size: float
    d_txt_size: float


@dataclass
class _Problem:
    """What both references start from: the split, each row's upstream weight, the scale,
    the float64 unit features (and their divisors) and the row blocks."""

    B: int
    dim: int
    device: torch.device
    sizes: list[int]
    row_weight: torch.Tensor
    raw_scale: float
    s: float
    u: torch.Tensor
    v: torch.Tensor
    divisors: tuple | None
    rows_of: list[tuple[int, int]]

    @classmethod
    def of(cls, img, txt, logit_scale, sizes, weights, cap, normalize, block) -> _Problem:
        img, txt = img.detach(), txt.detach()
        B, dim = img.shape
        dev = img.device
        sizes = [B] if sizes is None else list(sizes)
        if sum(sizes) != B:
            raise ValueError(f"sizes {sizes} do not add up to the batch of {B}")
        weights = [1.0] * len(sizes) if weights is None else weights
        weights = torch.as_tensor(weights, dtype=torch.float64, device=dev)
        owner = torch.repeat_interleave(
            torch.arange(len(sizes), device=dev), torch.tensor(sizes, device=dev)
        )
        raw_scale = math.exp(logit_scale)
        if normalize:
            (u, u_div), (v, v_div) = _unit(img), _unit(txt)
            divisors = (u_div, v_div)
        else:
            u, v, divisors = img.double(), txt.double(), None
        block = block or max(1, (1 << 22) // max(B, 1))
        rows_of = [(i0, min(i0 + block, B)) for i0 in range(0, B, block)]
        return cls(
            B,
            dim,
            dev,
            sizes,
            weights[owner],
            raw_scale,
            min(raw_scale, cap),
            u,
            v,
            divisors,
            rows_of,
        )

    def input_grads(self, d_u, d_v):
        """Gradients w.r.t. the unit rows turned into those w.r.t. the raw features."""
        if self.divisors is None:
            return d_u, d_v
        return _unit_backward(d_u, self.u, self.divisors[0]), _unit_backward(
            d_v, self.v, self.divisors[1]
        )

    def input_sizes(self, d_u, d_v) -> tuple[float, float]:
        """The largest entry of each raw-feature gradient before the normalisation's
        projection, ``|dJ/du| / divisor``: what that projection's fp32 rounding is
        relative to (:class:`Reference`'s ``d_img_size``)."""
        grads = (
            (d_u, d_v)
            if self.divisors is None
            else (d_u / self.divisors[0], d_v / self.divisors[1])
        )
        return tuple(float(g.abs().max()) if g.numel() else 0.0 for g in grads)


def _unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 unit rows (eps 1e-6, as the loss) and the divisor of each row."""
    x = x.double()
    peak = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    norm = torch.linalg.vector_norm(x / peak, dim=1, keepdim=True) * peak
    divisor = norm.clamp_min(1e-6)
    return x / divisor, divisor


def _unit_backward(grad, u, divisor):
    dot = (u * grad).sum(1, keepdim=True) * (divisor > 1e-6)
    return (grad - u * dot) / divisor


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(x))`` to the dtype's accuracy everywhere (``F.softplus`` returns ``x``
    itself above 20, off by ``exp(-x)``: 2e-9, far above float64's rounding)."""
    return x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))


def _terms(s_block: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """``-log softmax`` at each row's positive column, to float64 relative accuracy."""
    rows = torch.arange(len(positives), device=s_block.device)
    diff = s_block - s_block[rows, positives][:, None]
    diff[rows, positives] = -math.inf
    return _softplus(torch.logsumexp(diff, dim=1))


def reference(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: float,
    *,
    sizes: list[int] | None = None,
    weights: list[float] | None = None,
    logit_scale_max: float = 100.0,
    scale_cap: str = "clamp",
    normalize: bool = True,
    precision: str = "ieee",
    block: int | None = None,
) -> Reference:
    """The float64 truth and fp32 error bounds for ``clip_loss`` on the global batch.

    ``img``/``txt`` are the whole global batch ``[B, D]`` in rank order; ``sizes`` splits
    it over ranks (default: one rank) and ``weights`` are the ranks' upstream gradients.
    ``precision`` is the matmul operand mode whose rounding the bounds allow for.
    Works in row blocks of ``block`` rows (memory ``O(block * B)``), so it runs at any
    ``B`` that fits ``B x D`` float64 features, on the device of ``img``; the results are
    tensors on that device.
    """
    p = _Problem.of(img, txt, logit_scale, sizes, weights, logit_scale_max, normalize, block)
    B, dim, dev, sizes, raw_scale, s = p.B, p.dim, p.device, p.sizes, p.raw_scale, p.s
    u, v, rows_of = p.u, p.v, p.rows_of
    w = p.row_weight / (2 * B)  # each row's / column's weight in J
    err = _LogitErrors(u, v, s, dim, OPERAND_UNIT[precision])

    # Pass 1: row terms and log-sum-exps; column log-sum-exps, online over row blocks.
    f64 = dict(dtype=torch.float64, device=dev)
    t_row = torch.empty(B, **f64)
    row_lse = torch.empty(B, **f64)
    col_lse = torch.full((B,), -math.inf, **f64)
    for i0, i1 in rows_of:
        sb = s * u[i0:i1] @ v.T
        t_row[i0:i1] = _terms(sb, torch.arange(i0, i1, device=dev))
        row_lse[i0:i1] = torch.logsumexp(sb, dim=1)
        col_lse = torch.logaddexp(col_lse, torch.logsumexp(sb, dim=0))
    t_col = torch.empty(B, **f64)
    for j0, j1 in rows_of:
        t_col[j0:j1] = _terms(s * v[j0:j1] @ u.T, torch.arange(j0, j1, device=dev))

    # Pass 2: how far each term moves under the logits' errors (first order), and the
    # columns' error-weighted means sum_i p_col[i, j] E[i, j].
    sens_row = torch.empty(B, **f64)
    sens_col = torch.zeros(B, **f64)
    col_mean_e = torch.zeros(B, **f64)
    for i0, i1 in rows_of:
        sb, e, pos = s * u[i0:i1] @ v.T, err.block(i0, i1), _positives(i0, i1, dev)
        p_row = torch.exp(sb - row_lse[i0:i1, None])
        p_col = torch.exp(sb - col_lse[None, :])
        sens_row[i0:i1] = _sensitivity(p_row, e, pos, dim=1)
        sens_col += _sensitivity(p_col, e, pos, dim=0)
        col_mean_e += (p_col * e).sum(0)

    # Pass 3: G = dJ/dS, the feature gradients, dJ/ds, and the bound on fp32's dJ/ds.
    d_u, d_v, g_dot, ds_bound = _clip_backward(p, w, err, row_lse, col_lse, col_mean_e)
    form = gamma(3 * B + 3)  # forming exp, the sums and the log of one term

    loss_i2t, loss_t2i = t_row.sum() / B, t_col.sum() / B
    per_term = sens_row + sens_col + form * (t_row + t_col) + 8 * UNDERFLOW
    share_terms = torch.stack([t.sum() for t in (t_row + t_col).split(sizes)])
    shares = share_terms / (2 * B)
    share_bounds = torch.stack(
        [
            (part.sum() + gamma(2 * n + 2) * terms) / (2 * B)
            for part, n, terms in zip(per_term.split(sizes), sizes, share_terms, strict=True)
        ]
    )
    loss_bound = float(per_term.sum() + gamma(2 * B + len(sizes) + 2) * share_terms.sum())
    loss_bound /= 2 * B

    if scale_cap == "clamp" and raw_scale > logit_scale_max:
        d_scale, d_scale_bound = 0.0, 0.0
    else:  # d/dtheta = exp(theta) * dJ/ds (straight-through: exp's gradient, uncapped)
        d_scale = raw_scale * g_dot
        d_scale_bound = raw_scale * ds_bound + gamma(3) * abs(d_scale)
    d_img, d_txt = p.input_grads(d_u, d_v)
    d_img_size, d_txt_size = p.input_sizes(d_u, d_v)
    return Reference(
        loss=shares.sum(),
        loss_i2t=loss_i2t,
        loss_t2i=loss_t2i,
        shares=shares,
        d_img=d_img,
        d_txt=d_txt,
        d_scale=torch.tensor(d_scale, **f64),
        loss_bound=loss_bound,
        share_bounds=share_bounds,
        d_scale_bound=d_scale_bound,
        d_img_size=d_img_size,
        d_txt_size=d_txt_size,
    )


class _LogitErrors:
    """``E_ij``, the bound on an fp32 logit's error, for a block of rows (module docstring).

    With rounded operands (``unit`` > 0) each product ``u_k v_k`` is also off by
    ``2.01 unit`` relative (two roundings and their product).
    """

    def __init__(self, u: torch.Tensor, v: torch.Tensor, s: float, dim: int, unit: float):
        self.abs_u, self.abs_v = u.abs(), v.abs()
        self.s, self.per_product = s, gamma(2 * dim + 4) + 2.01 * unit

    def dot_block(self, i0: int, i1: int) -> torch.Tensor:
        """The bound on the fp32 similarities ``U V^T`` of rows ``[i0, i1)``, unscaled."""
        return self.per_product * (self.abs_u[i0:i1] @ self.abs_v.T)

    def block(self, i0: int, i1: int) -> torch.Tensor:
        return self.s * (self.dot_block(i0, i1) + gamma(5))


def _clip_backward(p: _Problem, w, err: _LogitErrors, row_lse, col_lse, col_mean_e):
    """``(dJ/dU, dJ/dV, dJ/ds, bound on fp32's dJ/ds)`` of the CLIP loss, in row blocks.

    ``dJ/ds`` is formed as the backends form it (:mod:`palmtree.backends.base`): each
    similarity against its row's and its column's positive, the positives' own terms left
    out. ``sum G * (U V^T)`` would cancel at a peaked softmax in float64 too (``1e-16 /
    loss`` relative: nothing left of a loss of 1e-20); this keeps the truth's digits.
    """
    u, v, s, B, dev = p.u, p.v, p.s, p.B, p.device
    pair = torch.linalg.vecdot(u, v)  # <u_k, v_k>: row k's and column k's positive
    pair_err = err.per_product * torch.linalg.vecdot(u.abs(), v.abs())
    form = gamma(B + 2 * len(p.sizes) + 4)  # S - shift, exp, the sums, coef and product
    d_u, d_v = torch.zeros_like(u), torch.zeros_like(v)
    g_dot = ds_bound = 0.0
    for i0, i1 in p.rows_of:
        dot = u[i0:i1] @ v.T
        sb, e, pos = s * dot, err.block(i0, i1), _positives(i0, i1, dev)
        p_row = torch.exp(sb - row_lse[i0:i1, None])
        p_col = torch.exp(sb - col_lse[None, :])
        g = w[i0:i1, None] * p_row + w[None, :] * p_col
        g[pos] -= 2 * w[i0:i1]
        d_u[i0:i1] = s * g @ v
        d_v += s * g.T @ u[i0:i1]
        e_dot = err.dot_block(i0, i1)
        row_mean_e = (p_row * e).sum(1, keepdim=True)
        sides = (
            (w[i0:i1, None], p_row, pair[i0:i1, None], pair_err[i0:i1, None], row_mean_e),
            (w[None, :], p_col, pair[None, :], pair_err[None, :], col_mean_e[None, :]),
        )
        for weight, prob, positive, positive_err, mean_e in sides:
            diff = dot - positive
            diff_err = e_dot + positive_err + UNIT_ROUNDOFF * diff.abs()
            d_prob = prob * (e + mean_e + form)
            value, bound = _scale_terms(weight, prob, diff, d_prob, diff_err, pos, 2 * B + 2)
            g_dot += value
            ds_bound += bound
    return d_u, d_v, g_dot, ds_bound


def _scale_terms(weight, prob, diff, d_prob, diff_err, pos, n: int) -> tuple[float, float]:
    """``sum weight * prob * diff`` off the positives ``pos``, and the bound on its fp32
    value when ``prob`` and ``diff`` are off by up to ``d_prob`` and ``diff_err``: each
    term moves by ``|weight| (d_prob |diff| + prob diff_err)``, its two products round
    (``gamma(2)``) and may underflow, and the sum of ``n`` terms adds ``gamma(n)`` times
    their absolute sum. Where the terms share a sign (a peaked softmax) that is relative
    to the value; where they do not, it is what any formation's sum gets."""
    terms = weight * prob * diff
    terms[pos] = 0.0
    err = weight.abs() * (d_prob * diff.abs() + prob * diff_err) + gamma(2) * terms.abs()
    err += 2 * UNDERFLOW * ((1 + weight.abs()) * diff.abs() + 1)
    err[pos] = 0.0
    return float(terms.sum()), float(err.sum()) + gamma(n) * float(terms.abs().sum())


def _positives(i0: int, i1: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the positives in the block of rows ``[i0, i1)``: ``(local row, column)``."""
    rows = torch.arange(i1 - i0, device=device)
    return rows, i0 + rows


def _sensitivity(p, e, pos, *, dim: int) -> torch.Tensor:
    """``sum |d t / d S| E`` along ``dim`` for the terms ``t = -log p[positive]``."""
    dt = p.clone()
    dt[pos] -= 1.0
    return (dt.abs() * e).sum(dim)


def _softmax_error(p, e, mean_e, pos, pos_mean_e, form: float) -> torch.Tensor:
    """Bound on ``|fl(p) - p|`` for a softmax ``p`` whose logits carry errors ``e``.

    ``dp_ij = p_ij (dS_ij - sum_k p_ik dS_ik)``, bounded by ``p_ij (e_ij + mean_e)``; at
    the positive it is ``p (1 - p) dS_pos - p sum_{k != pos} p_k dS_k``, which vanishes
    with ``1 - p`` when the normalisation is consistent. ``form`` is the relative
    rounding of forming ``p`` itself. ``pos_mean_e`` is ``mean_e`` at each positive.
    """
    out = p * (e + mean_e + form)
    p_pos, e_pos = p[pos], e[pos]
    out[pos] = p_pos * ((1 - p_pos) * e_pos + (pos_mean_e - p_pos * e_pos) + form)
    return out


def plain_fp32(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: float,
    *,
    sizes: list[int] | None = None,
    weights: list[float] | None = None,
    logit_scale_max: float = 100.0,
    dtype: torch.dtype = torch.float32,
    precision: str | None = None,
) -> dict[str, torch.Tensor]:
    """The straightforward computation in ``dtype``: materialised logits, autograd.

    What "as good as plain fp32" compares against (gradient tensors, :func:`check_tensor`).
    Returns ``shares``, ``d_img``, ``d_txt`` and ``d_scale`` of ``J`` as :func:`reference`,
    on the device of ``img``. ``precision`` (``"ieee"``, ``"tf32"``, ``"bf16"``) makes the
    logits' product and its two backward products round their operands as that mode
    does, with fp32 accumulation (:mod:`palmtree.precision`): what a plain fp32 matmul
    does under ``torch.set_float32_matmul_precision``. ``None`` leaves ``@`` as it is.
    """
    sizes = [img.shape[0]] if sizes is None else list(sizes)
    i, t, theta, weights = _plain_inputs(img, txt, logit_scale, sizes, weights, dtype)
    u, v = F.normalize(i, dim=-1, eps=1e-6), F.normalize(t, dim=-1, eps=1e-6)
    logits = theta.exp().clamp(max=logit_scale_max) * _product(u, v, precision)
    labels = torch.arange(len(u), device=u.device)
    terms = F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(
        logits.T, labels, reduction="none"
    )
    shares = torch.stack([part.sum() for part in terms.split(sizes)]) / (2 * len(u))
    (shares * weights).sum().backward()
    return {"shares": shares.detach(), "d_img": i.grad, "d_txt": t.grad, "d_scale": theta.grad}


def _plain_inputs(img, txt, logit_scale, sizes, weights, dtype):
    """Leaf copies of the features and the log scale in ``dtype``, and the ranks' weights,
    all on the device of ``img``."""
    dev = img.device
    weights = [1.0] * len(sizes) if weights is None else weights
    i = img.detach().to(dtype, copy=True).requires_grad_()
    t = txt.detach().to(dtype, copy=True).requires_grad_()
    theta = torch.tensor(logit_scale, dtype=dtype, device=dev, requires_grad=True)
    return i, t, theta, torch.as_tensor(weights, dtype=dtype, device=dev)


def _product(u: torch.Tensor, v: torch.Tensor, precision: str | None) -> torch.Tensor:
    """``u @ v.T``, with the operands of it and of its backward rounded as ``precision``."""
    return u @ v.T if precision is None else _RoundedProduct.apply(u, v.T, precision)


class _RoundedProduct(torch.autograd.Function):
    """``a @ b`` whose forward and backward products round their operands as ``precision``."""

    @staticmethod
    def forward(ctx, a, b, precision):
        ctx.save_for_backward(a, b)
        ctx.precision = precision
        return _rounded_mm(a, b, precision)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        p = ctx.precision
        return _rounded_mm(grad, b.T, p), _rounded_mm(a.T, grad, p), None


def _rounded_mm(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    from .precision import cast_operand, mm

    return mm(cast_operand(a, precision), cast_operand(b, precision), precision)


@dataclass
class SigLipReference:
    """The float64 truth of the sigmoid loss's ``J = sum_r weights[r] * share_r`` (shares
    are the ranks' rows), with bounds for fp32 results as :class:`Reference`'s."""

    loss: torch.Tensor
    loss_pos: torch.Tensor
    loss_neg: torch.Tensor
    shares: torch.Tensor
    d_img: torch.Tensor
    d_txt: torch.Tensor
    d_scale: torch.Tensor
    d_bias: torch.Tensor
    loss_bound: float
    pos_bound: float
    neg_bound: float
    share_bounds: torch.Tensor
    d_scale_bound: float
    d_bias_bound: float
    d_img_size: float
    d_txt_size: float


def siglip_reference(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: float,
    logit_bias: float,
    *,
    sizes: list[int] | None = None,
    weights: list[float] | None = None,
    logit_scale_max: float = math.inf,
    scale_cap: str = "clamp",
    normalize: bool = True,
    precision: str = "ieee",
    block: int | None = None,
) -> SigLipReference:
    """The float64 truth and fp32 bounds for ``siglip_loss`` on the global batch.

    ``L = 1/B sum_ij softplus(-z_ij (s <u_i, v_j> + bias))``, ``z`` +1 on the positives and
    -1 elsewhere. The bounds follow the module docstring: each ``x = S + bias`` is off by
    ``E_ij + u |x|``, a term ``softplus(-z x)`` moves by ``sigmoid(-z x)`` times that and is
    formed to ``gamma(4)`` relative, ``G = -z sigmoid(-z x)`` by ``G (1 - sigmoid) dx``
    plus ``gamma(3) |G|``, and sums add ``gamma(n)`` times their absolute sums. Row
    blocks and the device as in :func:`reference`.
    """
    p = _Problem.of(img, txt, logit_scale, sizes, weights, logit_scale_max, normalize, block)
    B, dim, dev, sizes, raw_scale, s = p.B, p.dim, p.device, p.sizes, p.raw_scale, p.s
    u, v = p.u, p.v
    w = p.row_weight / B  # each row's weight in J
    err = _LogitErrors(u, v, s, dim, OPERAND_UNIT[precision])
    n_sum = 2 * B + len(sizes) + 2
    row_terms = torch.zeros(B, dtype=torch.float64, device=dev)
    row_term_bounds = torch.zeros(B, dtype=torch.float64, device=dev)
    pos = neg = pos_b = neg_b = g_dot = g_sum = ds_b = db_b = 0.0
    d_u, d_v = torch.zeros_like(u), torch.zeros_like(v)
    for i0, i1 in p.rows_of:
        rows, cols = _positives(i0, i1, dev)
        dot = u[i0:i1] @ v.T
        x = s * dot + logit_bias
        z = -torch.ones_like(x)
        z[rows, cols] = 1.0
        t = _softplus(-z * x)
        sig = torch.sigmoid(-z * x)
        dx = err.block(i0, i1) + UNIT_ROUNDOFF * x.abs()
        t_err = sig * dx + gamma(4) * t + 4 * UNDERFLOW
        row_terms[i0:i1] = t.sum(1)
        row_term_bounds[i0:i1] = t_err.sum(1)
        off = torch.ones_like(t, dtype=torch.bool)
        off[rows, cols] = False
        pos += float(t[rows, cols].sum())
        neg += float(t[off].sum())  # summed apart: tiny negatives must not vanish in pos
        pos_b += float(t_err[rows, cols].sum())
        neg_b += float(t_err[off].sum())
        g = w[i0:i1, None] * (-z * sig)
        d_u[i0:i1] = s * g @ v
        d_v += s * g.T @ u[i0:i1]
        g_dot += float((g * dot).sum())
        g_sum += float(g.sum())
        dg = g.abs() * ((1 - sig) * dx + gamma(3)) + 4 * UNDERFLOW
        ds_b += float((dg * dot.abs()).sum() + (g.abs() * (dx - UNIT_ROUNDOFF * x.abs())).sum() / s)
        ds_b += gamma(n_sum) * float((g * dot).abs().sum())
        db_b += float(dg.sum()) + gamma(n_sum) * float(g.abs().sum())
    total = float(row_terms.sum())
    share_terms = torch.stack([part.sum() for part in row_terms.split(sizes)])
    share_bounds = torch.stack(
        [
            (b.sum() + gamma(n_sum) * t) / B
            for b, t in zip(row_term_bounds.split(sizes), share_terms, strict=True)
        ]
    )
    loss_bound = (float(row_term_bounds.sum()) + gamma(n_sum) * total) / B
    if scale_cap == "clamp" and raw_scale > logit_scale_max:
        d_scale, d_scale_bound = 0.0, 0.0
    else:
        d_scale = raw_scale * g_dot
        d_scale_bound = raw_scale * ds_b + gamma(3) * abs(d_scale)
    f64 = dict(dtype=torch.float64, device=dev)
    d_img, d_txt = p.input_grads(d_u, d_v)
    d_img_size, d_txt_size = p.input_sizes(d_u, d_v)
    return SigLipReference(
        loss=torch.tensor(total / B, **f64),
        loss_pos=torch.tensor(pos / B, **f64),
        loss_neg=torch.tensor(neg / B, **f64),
        shares=share_terms / B,
        d_img=d_img,
        d_txt=d_txt,
        d_scale=torch.tensor(d_scale, **f64),
        d_bias=torch.tensor(g_sum, **f64),
        loss_bound=loss_bound,
        pos_bound=(pos_b + gamma(n_sum) * pos) / B,
        neg_bound=(neg_b + gamma(n_sum) * neg) / B,
        share_bounds=share_bounds,
        d_scale_bound=d_scale_bound,
        d_bias_bound=db_b,
        d_img_size=d_img_size,
        d_txt_size=d_txt_size,
    )


def plain_fp32_siglip(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: float,
    logit_bias: float,
    *,
    sizes: list[int] | None = None,
    weights: list[float] | None = None,
    logit_scale_max: float = math.inf,
    dtype: torch.dtype = torch.float32,
    precision: str | None = None,
) -> dict[str, torch.Tensor]:
    """The straightforward sigmoid loss in ``dtype``: materialised logits, autograd.

    On the device of ``img``; ``precision`` as in :func:`plain_fp32`.
    """
    sizes = [img.shape[0]] if sizes is None else list(sizes)
    i, t, theta, weights = _plain_inputs(img, txt, logit_scale, sizes, weights, dtype)
    bias = torch.tensor(logit_bias, dtype=dtype, device=img.device, requires_grad=True)
    u, v = F.normalize(i, dim=-1, eps=1e-6), F.normalize(t, dim=-1, eps=1e-6)
    logits = theta.exp().clamp(max=logit_scale_max) * _product(u, v, precision) + bias
    z = 2 * torch.eye(len(u), dtype=dtype, device=img.device) - 1
    rows = F.softplus(-z * logits).sum(1) / len(u)
    shares = torch.stack([part.sum() for part in rows.split(sizes)])
    (shares * weights).sum().backward()
    return {
        "shares": shares.detach(),
        "d_img": i.grad,
        "d_txt": t.grad,
        "d_scale": theta.grad,
        "d_bias": bias.grad,
    }


def worst_of_orders(
    plain,
    img,
    txt,
    exact,
    orders: int = 4,
    seed: int = 123,
    feature_keys: tuple[str, ...] = ("d_img", "d_txt"),
) -> dict:
    """``plain(img, txt)`` over ``orders`` feature orders, each output the worst one.

    Permuting the feature dimension of both sides leaves the math unchanged and gives
    another, equally valid fp32 summation order. One order's error is a single sample;
    the worst of a few is what the plain computation can be relied on to achieve, which
    makes "within 2x plain" a rule that holds on every machine, not only a lucky one.
    ``exact`` maps output names to their float64 truth (e.g. ``vars(reference(...))``);
    the outputs named in ``feature_keys`` are per-feature and permuted back.
    """
    g = torch.Generator().manual_seed(seed)
    worst: dict = {}
    for k in range(orders):
        perm = torch.arange(img.shape[1]) if k == 0 else torch.randperm(img.shape[1], generator=g)
        perm = perm.to(img.device)
        out = plain(img[:, perm], txt[:, perm])
        inv = torch.argsort(perm)
        for name in feature_keys:
            if name in out:
                out[name] = out[name][:, inv]
        for name, value in out.items():
            if name not in exact:
                continue
            err = max_error(value, exact[name])
            if name not in worst or err > worst[name][0]:
                worst[name] = (err, value)
    return {name: value for name, (_, value) in worst.items()}


def max_error(ours: torch.Tensor, exact: torch.Tensor) -> float:
    """``max |ours - exact|`` in float64 (NaN if ``ours`` holds a NaN)."""
    diff = (torch.as_tensor(ours).detach().double().cpu() - exact.detach().double().cpu()).abs()
    if diff.numel() == 0:
        return 0.0
    return float("nan") if bool(diff.isnan().any()) else float(diff.max())


def check_scalar(name: str, ours, exact: torch.Tensor, bound: float) -> float:
    """Asserts ``|ours - exact| <= bound`` (NaN fails); returns the error."""
    err = max_error(torch.as_tensor(ours), exact)
    if not err <= bound:
        raise AssertionError(
            f"{name}: error {err:.3e} > bound {bound:.3e} (value {float(exact):.6g})"
        )
    return err


def tensor_bound(
    plain, exact: torch.Tensor, factor: float = 2.0, rel: float = 1e-6, size: float = 0.0
) -> float:
    """What a gradient tensor may be off by: ``factor * max|plain - exact| + rel * max|exact|``
    (NaN if ``plain`` holds a NaN, so nothing passes against it).

    Where the truth is exactly 0 everywhere, ``rel`` is of ``size`` instead: what the
    rounding is relative to there. A raw-feature gradient at ``D = 1`` is such a case
    (:class:`Reference`'s ``d_img_size``): the normalisation's projection removes all of
    it, every fp32 formation leaves up to 2 ulps of each row's gradient before the
    projection, and on which rows those land differs between formations, so the plain
    maximum alone is no stable measure.
    """
    scale = float(exact.detach().double().abs().max()) if exact.numel() else 0.0
    return factor * max_error(plain, exact) + rel * (scale if scale > 0 else size)


def check_tensor(
    name: str,
    ours,
    plain: torch.Tensor,
    exact: torch.Tensor,
    factor: float = 2.0,
    rel=1e-6,
    size: float = 0.0,
) -> float:
    """Asserts ``max|ours - exact| <= factor * max|plain - exact| + rel * max|exact|``, with
    ``size`` for ``max|exact|`` where the truth is exactly 0 (:func:`tensor_bound`)."""
    bound = tensor_bound(plain, exact, factor, rel, size)
    err = max_error(ours, exact)
    if not err <= bound:
        raise AssertionError(
            f"{name}: error {err:.3e} > bound {bound:.3e} "
            f"(plain fp32 {max_error(plain, exact):.3e})"
        )
    return err
