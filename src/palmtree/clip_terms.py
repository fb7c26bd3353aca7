"""What the CLIP pass derives from the forward's statistics for its targets.

With every pair its own item (or same-item pairs ignored), each row's and each column's
only target is its own pair: the loss measures the softmax against the positive logit,
and the temperature's gradient each similarity against the positive's. With same-item
positives (docs/design.md §10) a row's target is uniform over its item's ``|P|`` columns:
the loss is measured against the *mean* logit over them, the temperature's gradient
against the mean similarity, and ``G`` subtracts ``w / |P|`` at every target. The means
come from the kernels' sums of each other target's difference to the own pair's
similarity (``pair_dot``): ``max - mean = (max - pos) + s * mean(pos - target)``, two
parts that do not cancel at magnitude ``s`` as ``max - s * mean(dot)`` would for
near-duplicates. With ``|P| = 1`` the sums are 0 and every value is the own pair's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .backends.base import ForwardStats, GradientTerms
from .distributed import Layout
from .targets import Targets
from .tracing import compiling


@dataclass
class TargetMeans:
    """``row_spread``/``col_spread``: [b] how far each local row's / column's own logit
    lies above the mean logit over its targets (``None``: 0, the own pair is the only
    target). ``row_dot`` [b] and ``col_dot`` [one per column, 0 for the extra negatives]:
    the mean similarity over each row's / column's targets."""

    row_spread: torch.Tensor | None
    col_spread: torch.Tensor | None
    row_dot: torch.Tensor
    col_dot: torch.Tensor


def padded(x: torch.Tensor, n: int | None, value: float = 0.0) -> torch.Tensor:
    """``x`` followed by ``n`` entries ``value``, one per extra negative column (``None``:
    no negatives; never a test of ``n`` itself, which the compiler may see as a run-time
    value)."""
    return x if n is None else torch.cat([x, x.new_full((n,), value)])


def target_means(
    stats: ForwardStats,
    targets: Targets | None,
    scale: torch.Tensor,
    pair_dot: torch.Tensor,
    col_pos_gap: torch.Tensor | None,
    layout: Layout,
    extra: int | None,
) -> TargetMeans:
    """The means each term is measured against (module docstring); ``extra``: the number
    of extra negative columns (``None``: none given)."""
    own = slice(layout.offset, layout.offset + layout.b_local)
    if targets is None or targets.ignore:
        return TargetMeans(None, None, pair_dot[own], padded(pair_dot, extra))
    row_gap = stats.row_pos_gap / targets.counts[own]
    col_gap = col_pos_gap / targets.counts
    row_dot, col_dot = pair_dot[own] - row_gap, pair_dot - col_gap
    spreads = scale * row_gap, scale * col_gap[own]
    return TargetMeans(*spreads, row_dot, padded(col_dot, extra))


def gradient_terms(
    targets: Targets | None, layout: Layout, weights: torch.Tensor, saved, extra: int | None
) -> GradientTerms:
    """The kernels' :class:`~palmtree.backends.base.GradientTerms` from the ranks'
    ``weights`` (their upstream gradients over ``2B``, times ``N``) and the forward's
    saved tensors. The extra negatives' columns have no softmax of their own: shift
    ``inf`` and coefficient 0 make their column part exactly 0.

    ``G`` at each own positive (``pos_grad``) is formed here. With the diagonal the only
    target it is ``w (p - 1)`` per direction, and ``1 - p`` is the negatives' share of
    the softmax, ``neg / sum``: so ``-(w_row neg_row / sum_row + w_col neg_col / sum_col)``,
    no cancellation where the softmax peaks (``p - 1`` formed from ``p`` would leave
    ``eps * w`` where the truth is far smaller). With same-item positives the target is
    ``w / |P|``, and ``p - w / |P|`` is formed as ``coef ((|P| - 1) e - neg) / |P|``
    (``e`` the positive's exp): the same form for an item of one pair."""
    row_max, row_sum, col_max, col_sum, diag, pair_dot, col_dot, row_dot = saved[3:11]
    row_neg, col_neg = saved[11:13]  # the negatives' sums: each own row's, own column's
    offset, b = layout.offset, layout.b_local
    own = slice(offset, offset + b)
    w_row = weights[layout.rank].expand(b)
    w_col = layout.per_column(weights)
    col_shift = padded(col_max, extra, math.inf)
    col_coef = padded(w_col / col_sum, extra)
    rows = (row_max, w_row / row_sum, col_shift, col_coef)
    pair_dot = padded(pair_dot, extra)
    row_coef, own_coef = rows[1], col_coef[own]
    if targets is None or targets.ignore:
        pos_grad = -(row_coef * row_neg + own_coef * col_neg)
        return GradientTerms(*rows, pos_grad, diag, pair_dot, targets)
    counts = targets.counts
    row_target = w_row / counts[own]
    col_target = padded(w_col / counts, extra)
    # p - w / |P| = coef ((|P| - 1) e - neg) / |P| per direction (e: the positive's exp):
    # exactly the form above for an item of one pair, a true difference for larger ones.
    c = counts[own]
    row_part = row_coef * ((c - 1) * torch.exp(diag - row_max) - row_neg)
    col_part = own_coef * ((c - 1) * torch.exp(diag - col_max[own]) - col_neg)
    pos_grad = (row_part + col_part) / c
    means = (row_dot, col_dot, row_target, col_target)
    return GradientTerms(*rows, pos_grad, diag, pair_dot, targets, *means)


def pairs_hint(negatives, targets, B) -> dict:
    """``{"pairs": B}`` for the chunked passes without labels when there are extra
    negatives: their columns need no statistics of their own. Not under ``torch.compile``,
    where ``B`` may be a value the graph reads at run time."""
    if negatives is None or targets is not None or compiling():
        return {}
    return {"pairs": B}
