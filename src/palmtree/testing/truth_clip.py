"""The float64 truth of the CLIP (softmax) loss and bounds for fp32 results.

Named steps over row blocks of the logits, each block with its targets
(:meth:`~palmtree.testing.problem.Problem.targets`): the softmaxes' terms and log-sum-exps
(:func:`_softmaxes`), how far the terms move under the logits' errors
(:func:`_sensitivities`), the gradients and the bound on the temperature's
(:func:`_clip_backward`), then the loss's fields (:func:`_losses`) and the gradients'
(:meth:`~palmtree.testing.problem.Problem.gradients`, shared with SigLIP's truth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .problem import Problem, softplus
from .rounding import OPERAND_UNIT, UNDERFLOW, UNIT_ROUNDOFF, LogitErrors, gamma
from .targets import Targets


@dataclass
class ClipTruth:
    """The float64 truth of ``J = sum_r weights[r] * share_r`` and bounds for fp32 results.

    ``loss`` is the global loss (the shares' sum), ``shares[r]`` rank ``r``'s part of it
    (what rank ``r`` returns is ``N * shares[r]``), ``d_img``/``d_txt``/``d_scale`` the
    gradients of ``J`` w.r.t. the raw features and the *log* scale. ``*_bound`` bound the
    error of an fp32 computation of the same value (package docstring). ``d_img_size`` and
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


def clip_truth(
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
) -> ClipTruth:
    """The float64 truth and fp32 error bounds for ``clip_loss`` on the global batch.

    ``img``/``txt`` are the whole global batch ``[B, D]`` in rank order; ``sizes`` splits
    it over ranks (default: one rank) and ``weights`` are the ranks' upstream gradients.
    ``precision`` is the matmul operand mode whose rounding the bounds allow for.
    Works in row blocks of ``block`` rows (memory ``O(block * B)``), so it runs at any
    ``B`` that fits ``B x D`` float64 features, on the device of ``img``; the results are
    tensors on that device. Not the ``backend="reference"`` of the loss: that one is fp32,
    and this is what it is checked against.
    """
    p = Problem.of(
        img,
        txt,
        logit_scale,
        sizes=sizes,
        weights=weights,
        cap=logit_scale_max,
        scale_cap=scale_cap,
        normalize=normalize,
        block=block,
    )
    w = p.row_weight / (2 * p.B)  # each row's / column's weight in J
    err = LogitErrors(p.u, p.v, p.s, p.dim, OPERAND_UNIT[precision])
    soft = _softmaxes(p)
    sens = _sensitivities(p, err, soft)
    d_u, d_v, g_dot, ds_bound = _clip_backward(p, w, err, soft, sens.col_mean_e)
    return ClipTruth(**_losses(p, soft, sens), **p.gradients(d_u, d_v, g_dot, ds_bound))


@dataclass
class _Softmaxes:
    """Each row's and each column's term ``-log p_target`` and log-sum-exp."""

    t_row: torch.Tensor
    t_col: torch.Tensor
    row_lse: torch.Tensor
    col_lse: torch.Tensor

    def probabilities(self, sb: torch.Tensor, i0: int, i1: int):
        """The row and the column softmax of the logits ``sb`` of rows ``[i0, i1)``."""
        return torch.exp(sb - self.row_lse[i0:i1, None]), torch.exp(sb - self.col_lse[None, :])


def _softmaxes(p: Problem) -> _Softmaxes:
    """Row terms and log-sum-exps; column log-sum-exps online over row blocks; column
    terms from the text rows' own blocks."""
    f64 = dict(dtype=torch.float64, device=p.device)
    t_row = torch.empty(p.B, **f64)
    row_lse = torch.empty(p.B, **f64)
    col_lse = torch.full((p.B,), -math.inf, **f64)
    for i0, i1 in p.rows_of:
        sb = p.row_logits(i0, i1)
        t_row[i0:i1] = _terms(sb, p.targets(i0, i1))
        row_lse[i0:i1] = torch.logsumexp(sb, dim=1)
        col_lse = torch.logaddexp(col_lse, torch.logsumexp(sb, dim=0))
    t_col = torch.empty(p.B, **f64)
    for j0, j1 in p.rows_of:
        t_col[j0:j1] = _terms(p.col_logits(j0, j1), p.targets(j0, j1))
    return _Softmaxes(t_row, t_col, row_lse, col_lse)


def _terms(s_block: torch.Tensor, targets: Targets) -> torch.Tensor:
    """``-log softmax`` at each row's target column, to float64 relative accuracy: the
    log-sum-exp of the other columns' differences to it, through ``softplus``."""
    rows, cols = targets.index
    diff = s_block - s_block[rows, cols][:, None]
    diff[rows, cols] = -math.inf
    return softplus(torch.logsumexp(diff, dim=1))


@dataclass
class _Sensitivities:
    """How far each row's and column's term moves under the logits' errors (first
    order), and the columns' error-weighted means ``sum_i p_col[i, j] E[i, j]``."""

    row: torch.Tensor
    col: torch.Tensor
    col_mean_e: torch.Tensor


def _sensitivities(p: Problem, err: LogitErrors, soft: _Softmaxes) -> _Sensitivities:
    f64 = dict(dtype=torch.float64, device=p.device)
    row = torch.empty(p.B, **f64)
    col = torch.zeros(p.B, **f64)
    col_mean_e = torch.zeros(p.B, **f64)
    for i0, i1 in p.rows_of:
        sb, e, pos = p.row_logits(i0, i1), err.block(i0, i1), p.targets(i0, i1)
        p_row, p_col = soft.probabilities(sb, i0, i1)
        row[i0:i1] = _sensitivity(p_row, e, pos, dim=1)
        col += _sensitivity(p_col, e, pos, dim=0)
        col_mean_e += (p_col * e).sum(0)
    return _Sensitivities(row, col, col_mean_e)


def _sensitivity(p, e, targets: Targets, *, dim: int) -> torch.Tensor:
    """``sum |d t / d S| E`` along ``dim`` for the terms ``t = -log p[target]``."""
    dt = p.clone()
    dt[targets.index] -= 1.0
    return (dt.abs() * e).sum(dim)


def _losses(p: Problem, soft: _Softmaxes, sens: _Sensitivities) -> dict:
    """The truth's loss fields: the loss, its two directions, the shares, their bounds.

    Each term moves by its sensitivity and is formed to ``gamma(3B + 3)`` (exp, the sums
    and the log of one term); sums of ``n`` terms add ``gamma(n)`` of their sum."""
    B, sizes, t_row, t_col = p.B, p.sizes, soft.t_row, soft.t_col
    per_term = sens.row + sens.col + gamma(3 * B + 3) * (t_row + t_col) + 8 * UNDERFLOW
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
    return dict(
        loss=shares.sum(),
        loss_i2t=t_row.sum() / B,
        loss_t2i=t_col.sum() / B,
        shares=shares,
        loss_bound=loss_bound,
        share_bounds=share_bounds,
    )


def _clip_backward(p: Problem, w, err: LogitErrors, soft: _Softmaxes, col_mean_e):
    """``(dJ/dU, dJ/dV, dJ/ds, bound on fp32's dJ/ds)`` of the CLIP loss, in row blocks.

    ``G = dJ/dS`` is each row's weight times its softmax plus its column's, less both
    weights at the targets. ``dJ/ds`` is formed as the backends form it
    (:mod:`palmtree.backends.base`): each similarity against its row's and its column's
    target, the targets' own terms left out. ``sum G * (U V^T)`` would cancel at a
    peaked softmax in float64 too (``1e-16 / loss`` relative: nothing left of a loss of
    1e-20); this keeps the truth's digits.
    """
    # Each image's and each text's similarity with its target, and their errors.
    pair, col_pair = p.target_dots(p.u, p.v), p.target_dots(p.v, p.u)
    pair_err = err.per_product * p.target_dots(p.u.abs(), p.v.abs())
    col_pair_err = err.per_product * p.target_dots(p.v.abs(), p.u.abs())
    form = gamma(p.B + 2 * len(p.sizes) + 4)  # S - shift, exp, the sums, coef and product
    d_u, d_v = torch.zeros_like(p.u), torch.zeros_like(p.v)
    g_dot = ds_bound = 0.0
    for i0, i1 in p.rows_of:
        dot = p.dots(i0, i1)
        sb, e, targets = p.s * dot, err.block(i0, i1), p.targets(i0, i1)
        p_row, p_col = soft.probabilities(sb, i0, i1)
        g = w[i0:i1, None] * p_row + w[None, :] * p_col
        g[targets.index] -= w[i0 + targets.rows] + w[targets.cols]
        d_u[i0:i1] = p.s * g @ p.v
        d_v += p.s * g.T @ p.u[i0:i1]
        e_dot = err.dot_block(i0, i1)
        row_mean_e = (p_row * e).sum(1, keepdim=True)
        sides = (
            (w[i0:i1, None], p_row, pair[i0:i1, None], pair_err[i0:i1, None], row_mean_e),
            (w[None, :], p_col, col_pair[None, :], col_pair_err[None, :], col_mean_e[None, :]),
        )
        for weight, prob, positive, positive_err, mean_e in sides:
            diff = dot - positive
            diff_err = e_dot + positive_err + UNIT_ROUNDOFF * diff.abs()
            d_prob = prob * (e + mean_e + form)
            value, bound = _scale_terms(weight, prob, diff, d_prob, diff_err, targets, 2 * p.B + 2)
            g_dot += value
            ds_bound += bound
    return d_u, d_v, g_dot, ds_bound


def _scale_terms(weight, prob, diff, d_prob, diff_err, targets: Targets, n: int):
    """``sum weight * prob * diff`` off the ``targets``, and the bound on its fp32 value
    when ``prob`` and ``diff`` are off by up to ``d_prob`` and ``diff_err``: each term
    moves by ``|weight| (d_prob |diff| + prob diff_err)``, its two products round
    (``gamma(2)``) and may underflow, and the sum of ``n`` terms adds ``gamma(n)`` times
    their absolute sum. Where the terms share a sign (a peaked softmax) that is relative
    to the value; where they do not, it is what any formation's sum gets."""
    terms = weight * prob * diff
    terms[targets.index] = 0.0
    err = weight.abs() * (d_prob * diff.abs() + prob * diff_err) + gamma(2) * terms.abs()
    err += 2 * UNDERFLOW * ((1 + weight.abs()) * diff.abs() + 1)
    err[targets.index] = 0.0
    return float(terms.sum()), float(err.sum()) + gamma(n) * float(terms.abs().sum())
