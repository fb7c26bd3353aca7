"""The single-pass distributed protocol shared by the ``chunked`` and ``fused`` backends.

Per rank ``r`` with unit image rows ``U_r`` and unit text rows ``V_r`` (docs/design.md §1-2):

forward
  1. all-gather the texts: ``V_all`` (``B x D``); images never leave the rank;
  2. kernel pass over ``S_r = s * U_r V_all^T``: row log-sum-exps (complete), column
     partial log-sum-exps over the local rows, maxima and the positives;
  3. one MAX all-reduce and one SUM all-reduce complete the column log-sum-exps (the
     SUM also brings every global pair's ``<u_k, v_k>``, for the temperature's gradient);
  4. rank ``r`` returns ``N * share_r``; the metrics are reduced with one more small
     all-reduce.

backward
  1. all-gather the N upstream gradients (they may differ per rank);
  2. kernel pass recomputing ``S_r``: ``dU_r``, this rank's partial ``dV`` for every
     column, and its part of ``ds``;
  3. one reduce-scatter sends each rank the sum of every rank's ``dV`` for its texts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .backends.base import ForwardStats, Kernels
from .clip_terms import gradient_terms, padded, pairs_hint, target_means
from .collectives import all_gather_scalar, all_reduce, gather_rows, reduce_scatter_rows
from .distributed import Layout
from .normalize import unit_rows, unit_rows_backward
from .precision import rounded
from .targets import Targets


@dataclass(frozen=True)
class PassOptions:
    kernels: Kernels
    layout: Layout
    precision: str
    chunk_size: int | None
    normalize: bool = True
    #: Same-item labels (``None``: every pair its own item; see :mod:`palmtree.targets`).
    targets: Targets | None = None


def nll_terms(row_max, neg, diag, spread=None) -> torch.Tensor:
    """``logsumexp_j S[i, j] - mean_i`` from a row's (max, sum of ``exp(S - max)`` over all
    but its own pair's column, own pair's logit ``pos``, ``spread = pos - mean_i``, the
    mean logit over its targets; ``None``: 0, the own pair is the only target).

    Formed so that each term keeps fp32 *relative* accuracy however small it is: it is
    ``(max - pos) + spread + log(exp(pos - max) + neg)``, and the log is ``log1p(neg)``
    when the own pair is the maximum. ``(max + log(sum)) - pos`` would cancel at
    magnitude ``scale``.
    """
    gap = row_max - diag
    lead = gap if spread is None else gap + spread
    return torch.where(gap > 0, lead + torch.log(torch.exp(-gap) + neg), lead + torch.log1p(neg))


def pair_dots(u: torch.Tensor, v: torch.Tensor, precision: str) -> torch.Tensor:
    """``<u_i, v_i>`` of each local pair from operands rounded as the products' are (exact
    fp32 products of tf32/bf16 values), for the temperature's gradient (:mod:`.backends.base`)."""
    return torch.linalg.vecdot(rounded(u, precision), rounded(v, precision))


def complete_columns(stats: ForwardStats, pairs: torch.Tensor, layout: Layout):
    """Global column ``(max, negatives' sum, sum)`` of the ``B`` pairs' columns from every
    rank's partials, every global pair's similarity from each rank's ``pairs``
    (:func:`pair_dots`), and, with same-item positives, the columns' ``(sum over their
    other targets of the own pair's similarity less the target's, largest logit at a
    target)`` (else ``None, None``).

    One MAX all-reduce, then one SUM all-reduce: each rank adds its own columns' positives
    (which only it computed) to the full sums, and its pairs' similarities to zeros.
    """
    offset, b, B = layout.offset, layout.b_local, layout.b_global
    col_max, col_neg = stats.col_max[:B], stats.col_neg[:B]  # not the extra negatives'
    positives = stats.col_pos_gap is not None
    maxima = torch.stack([col_max, stats.col_pos_max[:B]]) if positives else col_max[None]
    maxima = all_reduce(maxima, layout, "max")
    global_max = maxima[0]
    rows = [col_neg, col_neg, torch.zeros_like(col_neg)]
    sums = torch.stack(rows + [stats.col_pos_gap[:B]] if positives else rows)
    sums[1, offset : offset + b] += torch.exp(stats.diag - col_max[offset : offset + b])
    # A rank with no rows (or whose rows a column ignores) has partials (-inf, 0): its
    # rescaled sums are 0 * 0 = 0. The global max is finite: the pair's own row counts.
    sums[:2] *= torch.exp(col_max - global_max)
    sums[2, offset : offset + b] = pairs
    sums = all_reduce(sums, layout)
    extra = (sums[3], maxima[1]) if positives else (None, None)
    return global_max, sums[0], sums[1], sums[2], *extra


def _unit_inputs(ctx, image, text, negatives, opts: PassOptions):
    """This rank's unit image rows and every rank's unit text rows, then every rank's
    unit extra negatives after them; ``ctx`` keeps what the backward needs to return
    gradients w.r.t. the raw features in their dtypes."""
    ctx.dtypes = image.dtype, text.dtype, None if negatives is None else negatives.dtype
    u, u_norms = unit_rows(image, opts.normalize)
    v, v_norms = unit_rows(text, opts.normalize)
    ctx.norms = u_norms, v_norms, None
    v_all = gather_rows(v, opts.layout)
    if negatives is None:
        return u, v_all
    n, n_norms = unit_rows(negatives, opts.normalize)
    ctx.norms = u_norms, v_norms, n_norms
    return u, torch.cat([v_all, gather_rows(n, opts.layout.negatives)])


def _input_grads(ctx, layout: Layout, du, dv_partial, u, v_cols):
    """The raw features' gradients: every rank's ``dV`` partials summed and sent home,
    then through the normalisation, in the features' dtypes (``None`` for absent
    negatives)."""
    offset, b, B = layout.offset, layout.b_local, layout.b_global
    (u_norms, v_norms, n_norms), (image_dtype, text_dtype, neg_dtype) = ctx.norms, ctx.dtypes
    dv = reduce_scatter_rows(dv_partial[:B].contiguous(), layout)
    du = unit_rows_backward(du, u, u_norms, image_dtype)
    dv = unit_rows_backward(dv, v_cols[offset : offset + b], v_norms, text_dtype)
    if n_norms is None:
        return du, dv, None
    negatives = layout.negatives
    dn = reduce_scatter_rows(dv_partial[B:].contiguous(), negatives)
    mine = v_cols[B + negatives.offset : B + negatives.offset + negatives.b_local]
    return du, dv, unit_rows_backward(dn, mine, n_norms, neg_dtype)


def _refuse_double_backward(ctx) -> None:
    """The single-pass backwards are not differentiable: say so rather than return a
    second derivative that silently misses the loss's part."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"backend={ctx.opts.kernels.name!r} gives first derivatives only, and this "
            "backward was asked to build a graph (create_graph=True, e.g. for a gradient "
            "penalty); use backend='reference', whose gradient is differentiable"
        )


def _hits(best_target, best) -> torch.Tensor:
    """How many rows (or columns) have their largest allowed logit at a target."""
    return (best_target >= best).sum().float()


class SinglePassLoss(torch.autograd.Function):
    """``(images_r, texts_r, negatives_r, s) -> (N * share_r, global metric sums)``.

    The rows are L2-normalised in fp32 here (``opts.normalize``); see the module docstring.
    First derivatives only: a backward that builds a graph (``create_graph=True``) raises.
    """

    @staticmethod
    def forward(ctx, image, text, negatives, scale, opts: PassOptions):
        layout, targets = opts.layout, opts.targets
        u, v_cols = _unit_inputs(ctx, image, text, negatives, opts)
        offset, b, B = layout.offset, layout.b_local, layout.b_global
        pairs = pair_dots(u, v_cols[offset : offset + b], opts.precision)
        ctx.extra = None if negatives is None else len(v_cols) - B
        if targets is not None and not targets.ignore:  # what the positives are measured by
            every = padded(gather_rows(pairs, layout), ctx.extra)
            targets = dataclasses.replace(targets, pair_dot=every)
        ctx.pairs = pairs_hint(negatives, targets, B)
        stats = opts.kernels.forward(
            u, v_cols, scale, offset, opts.precision, opts.chunk_size, targets, **ctx.pairs
        )
        col_max, col_neg, col_sum, pair_dot, col_pos_gap, col_pos_max = complete_columns(
            stats, pairs, layout
        )
        means = target_means(stats, targets, scale, pair_dot, col_pos_gap, layout, ctx.extra)
        own = slice(offset, offset + b)
        row_terms = nll_terms(stats.row_max, stats.row_neg, stats.diag, means.row_spread)
        col_terms = nll_terms(col_max[own], col_neg[own], stats.diag, means.col_spread)
        row_best = stats.diag if stats.row_pos_max is None else stats.row_pos_max
        col_best = stats.diag if col_pos_max is None else col_pos_max[own]
        sums = torch.stack(
            [
                row_terms.sum(),
                col_terms.sum(),
                _hits(row_best, stats.row_max),
                _hits(col_best, col_max[own]),
            ]
        )
        share = (sums[0] + sums[1]) / (2 * B)
        sums = all_reduce(sums, layout)

        ctx.opts = opts
        ctx.save_for_backward(
            u,
            v_cols,
            scale,
            stats.row_max,
            stats.row_sum,
            col_max,
            col_sum,
            stats.diag,
            pair_dot,
            means.col_dot,
            means.row_dot,
            stats.row_neg,
            col_neg[own],
        )
        ctx.mark_non_differentiable(sums)
        return layout.world_size * share, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        _refuse_double_backward(ctx)
        # backward() may be called inside the user's autocast region: the kernels'
        # products must keep the precision the forward chose.
        with torch.autocast(grad_loss.device.type, enabled=False):
            return SinglePassLoss._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        opts = ctx.opts
        u, v_cols, scale = ctx.saved_tensors[:3]
        layout = opts.layout.with_own_size(u.shape[0])
        # Each rank's share is weighted by its own upstream gradient (loss weights,
        # accumulation): gather them so every rank can weight every column.
        upstream = all_gather_scalar(grad_loss.detach().float(), layout)
        weights = upstream * (layout.world_size / (2 * layout.b_global))
        terms = gradient_terms(opts.targets, layout, weights, ctx.saved_tensors, ctx.extra)
        du, dv_partial, dscale = opts.kernels.backward(
            u, v_cols, scale, layout.offset, opts.precision, opts.chunk_size, terms, **ctx.pairs
        )
        du, dv, dn = _input_grads(ctx, layout, du, dv_partial, u, v_cols)
        return du, dv, dn, dscale.reshape(scale.shape), None


class SigmoidPassLoss(torch.autograd.Function):
    """The sigmoid (SigLIP) loss: ``(images_r, texts_r, negatives_r, s, bias) -> (N *
    share_r, sums)``.

    ``share_r`` is this rank's rows' part of ``L = 1/B sum_ij softplus(-z_ij (S_ij + bias))``
    (``j`` over the texts and the extra negatives). The loss is elementwise: the forward
    needs no statistics from other ranks (one MAX all-reduce of the column maxima serves
    the t2i accuracy only), the backward sends the text gradients home with one
    reduce-scatter. ``sums`` holds the global ``(sum of positive terms, sum of negative
    terms, i2t hits, t2i hits)``.
    """

    @staticmethod
    def forward(ctx, image, text, negatives, scale, bias, opts: PassOptions):
        layout = opts.layout
        u, v_cols = _unit_inputs(ctx, image, text, negatives, opts)
        offset, b, B = layout.offset, layout.b_local, layout.b_global
        stats = opts.kernels.sigmoid_forward(
            u, v_cols, scale, bias, offset, opts.precision, opts.chunk_size, opts.targets
        )
        positives = stats.col_pos_max is not None
        maxima = [stats.col_max[:B], stats.col_pos_max[:B]] if positives else [stats.col_max[:B]]
        maxima = all_reduce(torch.stack(maxima), layout, "max")
        own = slice(offset, offset + b)
        row_best = stats.diag if stats.row_pos_max is None else stats.row_pos_max
        col_best = maxima[1, own] if positives else stats.diag
        sums = torch.stack(
            [
                stats.pos_sum,
                stats.neg_sum,
                _hits(row_best, stats.row_max),
                _hits(col_best, maxima[0, own]),
            ]
        )
        share = (sums[0] + sums[1]) / B
        sums = all_reduce(sums, layout)
        ctx.opts = opts
        ctx.save_for_backward(u, v_cols, scale, bias)
        ctx.mark_non_differentiable(sums)
        return layout.world_size * share, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        _refuse_double_backward(ctx)
        with torch.autocast(grad_loss.device.type, enabled=False):
            opts = ctx.opts
            u, v_cols, scale, bias = ctx.saved_tensors
            layout = opts.layout.with_own_size(u.shape[0])
            upstream = all_gather_scalar(grad_loss.detach().float(), layout)
            weight = upstream[layout.rank] * (layout.world_size / layout.b_global)
            offset, b = layout.offset, layout.b_local
            du, dv_partial, dscale, dbias = opts.kernels.sigmoid_backward(
                u,
                v_cols,
                scale,
                bias,
                offset,
                opts.precision,
                opts.chunk_size,
                weight.expand(b),
                opts.targets,
            )
            du, dv, dn = _input_grads(ctx, layout, du, dv_partial, u, v_cols)
            return du, dv, dn, dscale.reshape(scale.shape), dbias.reshape(bias.shape), None
