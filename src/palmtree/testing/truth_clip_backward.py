"""The CLIP truth's backward: ``G = dJ/dS`` into the unit rows' gradients, and ``dJ/ds``
with the bound on its fp32 value, formed and bounded as the backends form it.

With ``dot = U C^T`` (``C``: the texts, then the negatives) and each row's targets
(:mod:`.targets`), every term ``t = lse - sum_j a_j S_j`` (``a_j = 1 / |P|`` at the
targets) has ``dt/ds = sum_j p_j (dot_j - m)``, ``m = sum_j a_j dot_j`` the mean of its
targets' similarities, because each softmax sums to one. That is how the backends form it
(:mod:`palmtree.backends.base`): each similarity against its row's and its column's
mean, a lone target's own term (exactly 0 in the math) left out rather than formed as a
difference of two differently rounded products. ``sum G * dot`` would cancel at a peaked
softmax in float64 too (``1e-16 / loss`` relative: nothing left of a loss of 1e-20);
this keeps the truth's digits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .problem import Problem
from .rounding import UNDERFLOW, UNIT_ROUNDOFF, LogitErrors, gamma
from .targets import Targets


@dataclass
class Softmaxes:
    """Each row's and each column's term ``-log p_target`` (less the targets' mean, where
    they are several) and log-sum-exp, the ignored entries left out."""

    t_row: torch.Tensor
    t_col: torch.Tensor
    row_lse: torch.Tensor
    col_lse: torch.Tensor

    def probabilities(self, sb: torch.Tensor, i0: int, i1: int):
        """The row softmax of the logits ``sb`` of rows ``[i0, i1)`` (every column) and the
        column softmax (the ``B`` texts' columns only; ignored entries at ``-inf``: 0)."""
        B = len(self.col_lse)
        return torch.exp(sb - self.row_lse[i0:i1, None]), torch.exp(
            sb[:, :B] - self.col_lse[None, :]
        )


def clip_backward(p: Problem, w, err: LogitErrors, soft: Softmaxes, col_mean_e):
    """``(dJ/dU, dJ/dC, dJ/ds, bound on fp32's dJ/ds)`` of the CLIP loss, in row blocks.

    ``G = dJ/dS`` is each row's weight times its softmax plus, in the texts' columns, its
    column's, less both weights times the target's weight ``1 / |P|`` at each target; 0 at
    the ignored entries, whose probabilities are 0. The negatives' columns have no column
    softmax and no weight of their own.
    """
    refs = (*_references(p, err, p.u, p.v), *_references(p, err, p.v, p.u), col_mean_e)
    d_u, d_c = torch.zeros_like(p.u), torch.zeros_like(p.cols)
    g_dot = ds_bound = 0.0
    for i0, i1 in p.rows_of:
        dot, targets = p.dots(i0, i1), p.targets(i0, i1)
        sb = targets.without_ignored(p.s * dot, -math.inf)
        p_row, p_col = soft.probabilities(sb, i0, i1)
        g = w[i0:i1, None] * p_row
        g[:, : p.B] += w[None, :] * p_col
        g[targets.index] -= targets.weights * (w[i0 + targets.rows] + w[targets.cols])
        d_u[i0:i1] = p.s * g @ p.cols
        d_c += p.s * g.T @ p.u[i0:i1]
        probs = (p_row, p_col)
        for value, bound in _scale_sides(p, w, err, dot, probs, targets, i0, i1, refs):
            g_dot += value
            ds_bound += bound
    return d_u, d_c, g_dot, ds_bound


def _references(p: Problem, err: LogitErrors, a: torch.Tensor, b: torch.Tensor):
    """Each row of ``a``'s mean target similarity with ``b`` (``m_i`` for ``a = U``, ``c_j``
    for ``a = V``) and the bound on its fp32 value: each similarity's ``per_product``
    share of ``sum_k |a_k b_k|``, and where several are averaged the sum's and the
    division's ``gamma(|P| + 1)``."""
    mean, n = p.target_dots(a, b)
    abs_mean, _ = p.target_dots(a.abs(), b.abs())
    unit = err.per_product
    if bool((n > 1).any()):
        unit = unit + torch.where(n > 1, gamma(n + 1.0), 0.0)
    return mean, unit * abs_mean


def _scale_sides(p: Problem, w, err, dot, probs, targets: Targets, i0, i1, refs):
    """The block's ``dJ/ds`` terms and their bounds, the image rows' side and then the
    text columns' (the texts' columns of the block only), one ``(value, bound)`` each;
    ``refs``: the rows' means ``m`` and their errors, the columns' ``c`` and theirs, and
    the columns' ``sum_i p_col E``.

    Each term ``w p (dot - m)`` moves by ``|w| (dp |dot - m| + p de)``: ``dp = p (E + sum
    p E + gamma(n + 2N + 4))`` (a softmax of logits off by ``E``, normalised by sums of
    ``n`` terms over ``N`` ranks), ``de`` the two similarities' errors and the
    subtraction's rounding."""
    B, (p_row, p_col) = p.B, probs
    e, e_dot = err.block(i0, i1), err.dot_block(i0, i1)
    form = gamma(p.n_cols + 2 * len(p.sizes) + 4)
    row_mean_e = (p_row * e).sum(1, keepdim=True)
    m, m_err, c, c_err, col_mean_e = refs
    rows = slice(i0, i1)
    sides = (
        (w[rows, None], p_row, dot, e, e_dot, m[rows, None], m_err[rows, None], row_mean_e),
        (
            w[None],
            p_col,
            dot[:, :B],
            e[:, :B],
            e_dot[:, :B],
            c[None],
            c_err[None],
            col_mean_e[None],
        ),
    )
    for weight, prob, dots, e_side, e_dots, ref, ref_err, mean_e in sides:
        diff = dots - ref
        diff_err = e_dots + ref_err + UNIT_ROUNDOFF * diff.abs()
        d_prob = prob * (e_side + mean_e + form)
        yield _scale_terms(weight, prob, diff, d_prob, diff_err, targets, p.n_cols + B + 2)


def _scale_terms(weight, prob, diff, d_prob, diff_err, targets: Targets, n: int):
    """``sum weight * prob * diff`` without the lone targets' own terms, and the bound on
    its fp32 value when ``prob`` and ``diff`` are off by up to ``d_prob`` and
    ``diff_err``: each term moves by ``|weight| (d_prob |diff| + prob diff_err)``, its two
    products round (``gamma(2)``) and may underflow, and the sum of ``n`` terms adds
    ``gamma(n)`` times their absolute sum. Where the terms share a sign (a peaked softmax)
    that is relative to the value; where they do not, it is what any formation's sum gets.
    Several targets' own terms are in the sum (each ``dot - m`` is not 0 in the math);
    the ignored entries are not, and carry no error."""
    terms = weight * prob * diff
    terms[targets.lone] = 0.0
    err = weight.abs() * (d_prob * diff.abs() + prob * diff_err) + gamma(2) * terms.abs()
    err += 2 * UNDERFLOW * ((1 + weight.abs()) * diff.abs() + 1)
    err[targets.lone] = 0.0
    err = targets.without_ignored(err, 0.0)
    return float(terms.sum()), float(err.sum()) + gamma(n) * float(terms.abs().sum())
