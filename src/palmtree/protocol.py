"""The single-pass distributed protocol shared by the ``chunked`` and ``fused`` backends.

Per rank ``r`` with unit image rows ``U_r`` and unit text rows ``V_r`` (DESIGN.md §1-2):

forward
  1. all-gather the texts: ``V_all`` (``B x D``); images never leave the rank;
  2. kernel pass over ``S_r = s * U_r V_all^T``: row log-sum-exps (complete), column
     partial log-sum-exps over the local rows, maxima and the positives;
  3. one MAX all-reduce and one SUM all-reduce complete the column log-sum-exps;
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
import torch.distributed as dist

from .backends.base import Kernels
from .distributed import Layout, all_gather_scalar, all_reduce_, gather_rows, reduce_scatter_rows


@dataclass(frozen=True)
class PassOptions:
    kernels: Kernels
    layout: Layout
    precision: str
    chunk_size: int | None
    normalize: bool = True
    eps: float = 1e-6


def unit_rows(x: torch.Tensor, normalize: bool, eps: float):
    """fp32 ``x / max(||x||, eps)`` row-wise, and the clamped norms (``None`` if not normalising).

    Done here rather than by autograd so that the backward can work in place on the
    gradient buffers: at large ``B`` the ``B x D`` temporaries of autograd's
    normalisation backward were a large part of the peak memory.
    """
    x = x.float()
    if not normalize:
        return x.contiguous(), None
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(eps)
    return (x / norm).contiguous(), norm


def unit_rows_backward(grad: torch.Tensor, u: torch.Tensor, norm, eps: float) -> torch.Tensor:
    """Gradient w.r.t. the raw rows, computed in place in ``grad`` (fp32)."""
    if norm is None or grad.numel() == 0:
        return grad
    # d(x/|x|) = (g - u <u, g>) / |x|; below eps the norm is a constant and only g / eps stays.
    dot = torch.bmm(u.unsqueeze(1), grad.unsqueeze(2)).squeeze(2)
    dot.mul_(norm > eps)
    return grad.addcmul_(u, dot, value=-1).div_(norm)


def complete_columns(
    col_max: torch.Tensor, col_sum: torch.Tensor, layout: Layout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global column (max, sum of exp) from every rank's partials: a MAX, then a SUM."""
    global_max = all_reduce_(col_max.clone(), layout, dist.ReduceOp.MAX)
    # A rank with no rows has partials (-inf, 0): its rescaled sum is 0 * 0 = 0. The
    # global max itself is finite, since every column has a row on some rank.
    rescaled = col_sum * torch.exp(col_max - global_max)
    return global_max, all_reduce_(rescaled, layout)


class SinglePassLoss(torch.autograd.Function):
    """``(images_r, texts_r, s) -> (N * share_r, global metric sums)``.

    The rows are L2-normalised in fp32 here (``opts.normalize``); see the module docstring.
    """

    @staticmethod
    def forward(ctx, image, text, scale, opts: PassOptions):
        layout = opts.layout
        ctx.dtypes = image.dtype, text.dtype
        u, u_norm = unit_rows(image, opts.normalize, opts.eps)
        v, v_norm = unit_rows(text, opts.normalize, opts.eps)
        o, b, big = layout.offset, layout.b_local, layout.b_global
        v_all = gather_rows(v, layout)
        stats = opts.kernels.forward(u, v_all, scale, o, opts.precision, opts.chunk_size)
        col_max, col_sum = complete_columns(stats.col_max, stats.col_sum, layout)
        col_lse = col_max + torch.log(col_sum)

        row_terms = stats.row_lse - stats.diag
        col_terms = col_lse[o : o + b] - stats.diag
        sums = torch.stack(
            [
                row_terms.sum(),
                col_terms.sum(),
                (stats.diag >= stats.row_max).sum().float(),
                (stats.diag >= col_max[o : o + b]).sum().float(),
            ]
        )
        share = (sums[0] + sums[1]) / (2 * big)
        all_reduce_(sums, layout)

        ctx.opts = opts
        ctx.save_for_backward(
            u, v_all, scale, stats.row_max, stats.row_sum, col_max, col_sum, u_norm, v_norm
        )
        ctx.mark_non_differentiable(sums)
        return layout.world_size * share, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        # backward() may be called inside the user's autocast region: the kernels'
        # products must keep the precision the forward chose.
        with torch.autocast(grad_loss.device.type, enabled=False):
            return SinglePassLoss._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        opts = ctx.opts
        layout = opts.layout
        u, v_all, scale, row_max, row_sum, col_max, col_sum, u_norm, v_norm = ctx.saved_tensors
        # Each rank's share is weighted by its own upstream gradient (loss weights,
        # accumulation): gather them so every rank can weight every column.
        upstream = all_gather_scalar(grad_loss.detach().float(), layout)
        weights = upstream * (layout.world_size / (2 * layout.b_global))
        o, b = layout.offset, layout.b_local
        w_row = weights[layout.rank].expand(b)
        w_col = weights[layout.owner_of_columns(weights.device)]
        du, dv_partial, dscale = opts.kernels.backward(
            u,
            v_all,
            scale,
            o,
            opts.precision,
            opts.chunk_size,
            row_max,
            w_row / row_sum,
            col_max,
            w_col / col_sum,
            w_row + w_col[o : o + b],
        )
        dv = reduce_scatter_rows(dv_partial, layout)
        du = unit_rows_backward(du, u, u_norm, opts.eps)
        dv = unit_rows_backward(dv, v_all[o : o + b], v_norm, opts.eps)
        image_dtype, text_dtype = ctx.dtypes
        return du.to(image_dtype), dv.to(text_dtype), dscale.reshape(scale.shape), None
