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

from dataclasses import dataclass

import torch

from .backends.base import ForwardStats, GradientTerms, Kernels
from .collectives import all_gather_scalar, all_reduce, gather_rows, reduce_scatter_rows
from .distributed import Layout
from .normalize import unit_rows, unit_rows_backward
from .precision import rounded


@dataclass(frozen=True)
class PassOptions:
    kernels: Kernels
    layout: Layout
    precision: str
    chunk_size: int | None
    normalize: bool = True


def nll_terms(row_max: torch.Tensor, neg: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """``logsumexp_j S[i, j] - S[i, positive]`` from a row's (max, negatives' sum, positive).

    Formed so that each term keeps fp32 *relative* accuracy however small it is: when the
    positive is the maximum the term is ``log1p(neg)``; otherwise ``neg >= 1`` (it holds
    the maximum's ``exp(0)``) and ``(max - pos) + log(exp(pos - max) + neg)`` adds two
    non-negative parts. ``(max + log(sum)) - pos`` would cancel at magnitude ``scale``.
    """
    gap = row_max - diag
    return torch.where(gap > 0, gap + torch.log(torch.exp(-gap) + neg), torch.log1p(neg))


def pair_dots(u: torch.Tensor, v: torch.Tensor, precision: str) -> torch.Tensor:
    """``<u_i, v_i>`` of each local pair from operands rounded as the products' are (exact
    fp32 products of tf32/bf16 values), for the temperature's gradient (:mod:`.backends.base`)."""
    return torch.linalg.vecdot(rounded(u, precision), rounded(v, precision))


def complete_columns(stats: ForwardStats, pairs: torch.Tensor, layout: Layout):
    """Global column ``(max, negatives' sum, sum)`` from every rank's partials, and every
    global pair's similarity from each rank's ``pairs`` (:func:`pair_dots`).

    One MAX all-reduce, then one SUM all-reduce: each rank adds its own columns' positives
    (which only it computed) to the full sums, and its pairs' similarities to zeros.
    """
    offset, b = layout.offset, layout.b_local
    global_max = all_reduce(stats.col_max, layout, "max")
    sums = torch.stack([stats.col_neg, stats.col_neg, torch.zeros_like(stats.col_neg)])
    sums[1, offset : offset + b] += torch.exp(stats.diag - stats.col_max[offset : offset + b])
    # A rank with no rows has partials (-inf, 0): its rescaled sums are 0 * 0 = 0. The
    # global max itself is finite, since every column has a row on some rank.
    sums[:2] *= torch.exp(stats.col_max - global_max)
    sums[2, offset : offset + b] = pairs
    sums = all_reduce(sums, layout)
    return global_max, sums[0], sums[1], sums[2]


def _unit_inputs(ctx, image, text, opts: PassOptions):
    """This rank's unit image rows and every rank's unit text rows; ``ctx`` keeps what the
    backward needs to return gradients w.r.t. the raw features in their dtypes."""
    ctx.dtypes = image.dtype, text.dtype
    u, u_norms = unit_rows(image, opts.normalize)
    v, v_norms = unit_rows(text, opts.normalize)
    ctx.norms = u_norms, v_norms
    return u, gather_rows(v, opts.layout)


def _input_grads(ctx, layout: Layout, du, dv_partial, u, v_all):
    """The raw features' gradients: every rank's ``dV`` partials summed and sent home,
    then through the normalisation, in the features' dtypes."""
    offset, b = layout.offset, layout.b_local
    dv = reduce_scatter_rows(dv_partial, layout)
    (u_norms, v_norms), (image_dtype, text_dtype) = ctx.norms, ctx.dtypes
    du = unit_rows_backward(du, u, u_norms, image_dtype)
    return du, unit_rows_backward(dv, v_all[offset : offset + b], v_norms, text_dtype)


def _refuse_double_backward(ctx) -> None:
    """The single-pass backwards are not differentiable: say so rather than return a
    second derivative that silently misses the loss's part."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"backend={ctx.opts.kernels.name!r} gives first derivatives only, and this "
            "backward was asked to build a graph (create_graph=True, e.g. for a gradient "
            "penalty); use backend='reference', whose gradient is differentiable"
        )


class SinglePassLoss(torch.autograd.Function):
    """``(images_r, texts_r, s) -> (N * share_r, global metric sums)``.

    The rows are L2-normalised in fp32 here (``opts.normalize``); see the module docstring.
    First derivatives only: a backward that builds a graph (``create_graph=True``) raises.
    """

    @staticmethod
    def forward(ctx, image, text, scale, opts: PassOptions):
        layout = opts.layout
        u, v_all = _unit_inputs(ctx, image, text, opts)
        offset, b, B = layout.offset, layout.b_local, layout.b_global
        stats = opts.kernels.forward(u, v_all, scale, offset, opts.precision, opts.chunk_size)
        pairs = pair_dots(u, v_all[offset : offset + b], opts.precision)
        col_max, col_neg, col_sum, pair_dot = complete_columns(stats, pairs, layout)

        row_terms = nll_terms(stats.row_max, stats.row_neg, stats.diag)
        col_terms = nll_terms(
            col_max[offset : offset + b], col_neg[offset : offset + b], stats.diag
        )
        sums = torch.stack(
            [
                row_terms.sum(),
                col_terms.sum(),
                (stats.diag >= stats.row_max).sum().float(),
                (stats.diag >= col_max[offset : offset + b]).sum().float(),
            ]
        )
        share = (sums[0] + sums[1]) / (2 * B)
        sums = all_reduce(sums, layout)

        ctx.opts = opts
        ctx.save_for_backward(
            u, v_all, scale, stats.row_max, stats.row_sum, col_max, col_sum, stats.diag, pair_dot
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
        u, v_all, scale, row_max, row_sum, col_max, col_sum, diag, pair_dot = ctx.saved_tensors
        layout = opts.layout.with_own_size(u.shape[0])
        # Each rank's share is weighted by its own upstream gradient (loss weights,
        # accumulation): gather them so every rank can weight every column.
        upstream = all_gather_scalar(grad_loss.detach().float(), layout)
        weights = upstream * (layout.world_size / (2 * layout.b_global))
        offset, b = layout.offset, layout.b_local
        w_row = weights[layout.rank].expand(b)
        w_col = layout.per_column(weights)
        # (shift, coef) of the rows, then of the columns: base.GradientTerms' order.
        coefs = (row_max, w_row / row_sum, col_max, w_col / col_sum)
        pos_weight = w_row + w_col[offset : offset + b]
        terms = GradientTerms(*coefs, pos_weight=pos_weight, diag=diag, pair_dot=pair_dot)
        du, dv_partial, dscale = opts.kernels.backward(
            u, v_all, scale, offset, opts.precision, opts.chunk_size, terms
        )
        du, dv = _input_grads(ctx, layout, du, dv_partial, u, v_all)
        return du, dv, dscale.reshape(scale.shape), None


class SigmoidPassLoss(torch.autograd.Function):
    """The sigmoid (SigLIP) loss: ``(images_r, texts_r, s, bias) -> (N * share_r, sums)``.

    ``share_r`` is this rank's rows' part of ``L = 1/B sum_ij softplus(-z_ij (S_ij + bias))``.
    The loss is elementwise: the forward needs no statistics from other ranks (one MAX
    all-reduce of the column maxima serves the t2i accuracy only), the backward sends
    the text gradients home with one reduce-scatter. ``sums`` holds the global
    ``(sum of positive terms, sum of negative terms, i2t hits, t2i hits)``.
    """

    @staticmethod
    def forward(ctx, image, text, scale, bias, opts: PassOptions):
        layout = opts.layout
        u, v_all = _unit_inputs(ctx, image, text, opts)
        offset, b, B = layout.offset, layout.b_local, layout.b_global
        kernels = opts.kernels
        stats = kernels.sigmoid_forward(
            u, v_all, scale, bias, offset, opts.precision, opts.chunk_size
        )
        col_max = all_reduce(stats.col_max, layout, "max")
        sums = torch.stack(
            [
                stats.pos_sum,
                stats.neg_sum,
                (stats.diag >= stats.row_max).sum().float(),
                (stats.diag >= col_max[offset : offset + b]).sum().float(),
            ]
        )
        share = (sums[0] + sums[1]) / B
        sums = all_reduce(sums, layout)
        ctx.opts = opts
        ctx.save_for_backward(u, v_all, scale, bias)
        ctx.mark_non_differentiable(sums)
        return layout.world_size * share, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        _refuse_double_backward(ctx)
        with torch.autocast(grad_loss.device.type, enabled=False):
            opts = ctx.opts
            u, v_all, scale, bias = ctx.saved_tensors
            layout = opts.layout.with_own_size(u.shape[0])
            upstream = all_gather_scalar(grad_loss.detach().float(), layout)
            weight = upstream[layout.rank] * (layout.world_size / layout.b_global)
            offset, b = layout.offset, layout.b_local
            du, dv_partial, dscale, dbias = opts.kernels.sigmoid_backward(
                u, v_all, scale, bias, offset, opts.precision, opts.chunk_size, weight.expand(b)
            )
            du, dv = _input_grads(ctx, layout, du, dv_partial, u, v_all)
            return du, dv, dscale.reshape(scale.shape), dbias.reshape(bias.shape), None
