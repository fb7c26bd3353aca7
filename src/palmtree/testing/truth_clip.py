"""The float64 truth of the CLIP (softmax) loss and bounds for fp32 results.

Named steps over row blocks of the logits, each block with its targets
(:meth:`~palmtree.testing.problem.Problem.targets`): the softmaxes' terms and log-sum-exps
(:func:`_softmaxes`), how far the terms move under the logits' errors
(:func:`_sensitivities`), the gradients and the bound on the temperature's
(:func:`~palmtree.testing.truth_clip_backward.clip_backward`), then the loss's fields
(:func:`_losses`) and the gradients' (:meth:`~palmtree.testing.problem.Problem.gradients`,
shared with SigLIP's truth).
"""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass

import torch

from .problem import Problem, softplus
from .rounding import OPERAND_UNIT, UNDERFLOW, LogitErrors, gamma
from .targets import Targets
from .truth_clip_backward import Softmaxes, clip_backward


@dataclass
class ClipTruth:
    """The float64 truth of ``J = sum_r weights[r] * share_r`` and bounds for fp32 results.

    ``loss`` is the global loss (the shares' sum), ``shares[r]`` rank ``r``'s part of it
    (what rank ``r`` returns is ``N * shares[r]``), ``d_img``/``d_txt``/``d_neg``/``d_scale``
    the gradients of ``J`` w.r.t. the raw features, the raw negatives (``[Nn, D]``, ``[0,
    D]`` when none) and the *log* scale. ``*_bound`` bound the error of an fp32 computation
    of the same value (package docstring). ``d_img_size``, ``d_txt_size`` and
    ``d_neg_size`` are the largest entries of the raw-feature gradients before the
    normalisation's projection removes each row's radial part (:func:`tensor_bound`'s
    ``size``): at ``D = 1`` it removes everything, the truth is 0 and an fp32 gradient is
    only that projection's rounding, a few ulps of this size. ``d_neg`` and ``d_neg_size``
    are attributes, not fields: ``dataclasses.asdict`` leaves them out (``vars`` has
    them), so field-wise comparisons never meet an empty tensor.
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
    d_neg: InitVar[torch.Tensor]
    d_neg_size: InitVar[float]

    def __post_init__(self, d_neg: torch.Tensor, d_neg_size: float) -> None:
        # Attributes, not fields: without negatives ``d_neg`` is ``[0, D]``, and the
        # field-wise comparisons (``dataclasses.asdict``) take each field's largest entry.
        self.d_neg, self.d_neg_size = d_neg, d_neg_size


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
    labels: torch.Tensor | None = None,
    same_label: str = "positive",
    negatives: torch.Tensor | None = None,
) -> ClipTruth:
    """The float64 truth and fp32 error bounds for ``clip_loss`` on the global batch.

    ``img``/``txt`` are the whole global batch ``[B, D]`` in rank order; ``sizes`` splits
    it over ranks (default: one rank) and ``weights`` are the ranks' upstream gradients.
    ``precision`` is the matmul operand mode whose rounding the bounds allow for.
    ``labels`` (``[B]`` integer ids, ``None``: all differ) says which pairs are the same
    item: under ``same_label="positive"`` each image's softmax aims at all texts of its
    label, ``1 / |P(i)|`` each (and each text's at those images), under ``"ignore"`` at
    its own pair alone with the others of its label left out of the softmax
    (:mod:`.targets`). ``negatives`` (``[Nn, D]``, global, rank 0's first) are extra text
    columns of every image row's softmax, normalised like the texts; they are no queries
    and have no terms of their own (their gradient is ``d_neg``).
    Works in row blocks of ``block`` rows (memory ``O(block * (B + Nn))``), so it runs at
    any ``B`` that fits ``B x D`` float64 features, on the device of ``img``; the results
    are tensors on that device. Not the ``backend="reference"`` of the loss: that one is
    fp32, and this is what it is checked against.
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
        labels=labels,
        same_label=same_label,
        negatives=negatives,
    )
    w = p.row_weight / (2 * p.B)  # each row's / column's weight in J
    err = LogitErrors(p.u, p.cols, p.s, p.dim, OPERAND_UNIT[precision])
    soft = _softmaxes(p)
    sens = _sensitivities(p, err, soft)
    d_u, d_c, g_dot, ds_bound = clip_backward(p, w, err, soft, sens.col_mean_e)
    return ClipTruth(**_losses(p, soft, sens), **p.gradients(d_u, d_c, g_dot, ds_bound))


def _softmaxes(p: Problem) -> Softmaxes:
    """Row terms and log-sum-exps; column log-sum-exps online over row blocks; column
    terms from the text rows' own blocks."""
    f64 = dict(dtype=torch.float64, device=p.device)
    t_row = torch.empty(p.B, **f64)
    row_lse = torch.empty(p.B, **f64)
    col_lse = torch.full((p.B,), -math.inf, **f64)
    for i0, i1 in p.rows_of:
        targets = p.targets(i0, i1)
        sb = targets.without_ignored(p.row_logits(i0, i1), -math.inf)
        t_row[i0:i1] = _terms(sb, targets)
        row_lse[i0:i1] = torch.logsumexp(sb, dim=1)
        col_lse = torch.logaddexp(col_lse, torch.logsumexp(sb[:, : p.B], dim=0))
    t_col = torch.empty(p.B, **f64)
    for j0, j1 in p.rows_of:
        targets = p.targets(j0, j1)
        t_col[j0:j1] = _terms(targets.without_ignored(p.col_logits(j0, j1), -math.inf), targets)
    return Softmaxes(t_row, t_col, row_lse, col_lse)


def _terms(s_block: torch.Tensor, targets: Targets) -> torch.Tensor:
    """``log-sum-exp - mean of the targets' logits`` of each row, to float64 relative
    accuracy: the log-sum-exp of the differences to that mean, for a lone target of the
    other columns' alone, through ``softplus`` (a term near 0 keeps its digits; one of
    several targets is at least ``log 2``)."""
    rows, cols = targets.index
    mean = targets.mean(s_block[rows, cols], len(s_block))
    diff = s_block - mean[:, None]
    lone_rows, lone_cols = targets.lone
    diff[lone_rows, lone_cols] = -math.inf
    lse = torch.logsumexp(diff, dim=1)
    if targets.weight is None:
        return softplus(lse)
    lone = torch.zeros_like(lse, dtype=torch.bool)
    lone[lone_rows] = True
    return torch.where(lone, softplus(lse), lse)


@dataclass
class _Sensitivities:
    """How far each row's and column's term moves under the logits' errors (first
    order), and the columns' error-weighted means ``sum_i p_col[i, j] E[i, j]``."""

    row: torch.Tensor
    col: torch.Tensor
    col_mean_e: torch.Tensor


def _sensitivities(p: Problem, err: LogitErrors, soft: Softmaxes) -> _Sensitivities:
    f64 = dict(dtype=torch.float64, device=p.device)
    row = torch.empty(p.B, **f64)
    col = torch.zeros(p.B, **f64)
    col_mean_e = torch.zeros(p.B, **f64)
    for i0, i1 in p.rows_of:
        e, pos = err.block(i0, i1), p.targets(i0, i1)
        sb = pos.without_ignored(p.row_logits(i0, i1), -math.inf)
        p_row, p_col = soft.probabilities(sb, i0, i1)
        row[i0:i1] = _sensitivity(p_row, e, pos, dim=1)
        col += _sensitivity(p_col, e[:, : p.B], pos, dim=0)
        col_mean_e += (p_col * e[:, : p.B]).sum(0)
    return _Sensitivities(row, col, col_mean_e)


def _sensitivity(p, e, targets: Targets, *, dim: int) -> torch.Tensor:
    """``sum |d t / d S| E`` along ``dim`` for the terms ``t = lse - mean of the targets``:
    ``p`` less each target's weight (ignored entries have ``p = 0`` and add nothing)."""
    dt = p.clone()
    dt[targets.index] -= targets.weights
    return (dt.abs() * e).sum(dim)


def _losses(p: Problem, soft: Softmaxes, sens: _Sensitivities) -> dict:
    """The truth's loss fields: the loss, its two directions, the shares, their bounds.

    Each term moves by its sensitivity and is formed to ``gamma(3n + 3)`` (exp, the sums
    and the log of one term over ``n`` columns), as it is from non-negative parts (a lone
    target: its row's maximum, the others' sum, itself; several: the mean of the
    maximum's differences to them plus ``log`` of the sum); sums of ``n`` terms add
    ``gamma(n)`` of their sum."""
    B, sizes, t_row, t_col = p.B, p.sizes, soft.t_row, soft.t_col
    per_term = sens.row + sens.col + gamma(3 * p.n_cols + 3) * (t_row + t_col) + 8 * UNDERFLOW
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
