"""The loss's collectives on rows, for ranks that hold different numbers of pairs.

Rows are padded to the largest rank for the fixed-size collectives and unpadded
afterwards; a rank may hold none. Eager calls use ``torch.distributed``'s collectives
(gloo on CPU, NCCL on GPUs); under ``torch.compile`` the same ones from
``torch.distributed._functional_collectives``, which the compiler traces (the batch sizes
are then values the graph reads at run time, so the equal-split shortcuts are not taken).
Each function returns its result; with one rank it returns its input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .distributed import Layout, all_gather_into, functional_group
from .tracing import compiling

# torch 2.13 renamed the fixed-size collectives (see distributed.all_gather_into).
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_flat(x: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``x`` (the same shape on each) stacked along dim 0."""
    if compiling():
        from torch.distributed import _functional_collectives as fc

        return fc.all_gather_tensor(x.contiguous(), 0, functional_group(group))
    world_size = dist.get_world_size(group)
    out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
    all_gather_into(out, x.contiguous(), group=group)
    return out


def _equal_split(layout: Layout) -> bool:
    return not compiling() and all(s == layout.b_max for s in layout.sizes)


def gather_rows(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """All ranks' rows of ``x`` concatenated in rank order (``[B, ...]``), no autograd."""
    if layout.world_size == 1:
        return x
    padded = x.new_zeros((layout.b_max, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = all_gather_flat(padded, layout.group)
    if _equal_split(layout):
        return out
    # narrow, not a slice: its length is the rank's size itself, also to the compiler
    return torch.cat([out.narrow(0, r * layout.b_max, s) for r, s in enumerate(layout.sizes)])


def reduce_scatter_rows(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Sums ``[B, ...]`` partials over ranks and returns this rank's ``[b_local, ...]`` rows."""
    if layout.world_size == 1:
        return x
    if _equal_split(layout):
        padded = x.contiguous()
    else:
        padded = x.new_zeros((layout.world_size * layout.b_max, *x.shape[1:]))
        start = 0
        for r, s in enumerate(layout.sizes):
            padded.narrow(0, r * layout.b_max, s).copy_(x.narrow(0, start, s))
            start += s
    if compiling():
        from torch.distributed import _functional_collectives as fc

        out = fc.reduce_scatter_tensor(padded, "sum", 0, functional_group(layout.group))
    else:
        out = x.new_empty((layout.b_max, *x.shape[1:]))
        _reduce_scatter(out, padded, op=dist.ReduceOp.SUM, group=layout.group)
    return out[: layout.b_local]


def all_reduce(x: torch.Tensor, layout: Layout, op: str = "sum") -> torch.Tensor:
    """``x`` summed (``op="sum"``) or maximised (``"max"``) over the ranks."""
    if layout.world_size == 1:
        return x
    if compiling():
        from torch.distributed import _functional_collectives as fc

        return fc.all_reduce(x, op, functional_group(layout.group))
    reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
    x = x.clone()
    dist.all_reduce(x, op=reduce_op, group=layout.group)
    return x


def all_gather_scalar(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``[world_size]`` tensor of every rank's value of the 0-dim tensor ``x``."""
    x = x.reshape(1)
    if layout.world_size == 1:
        return x
    return all_gather_flat(x, layout.group)


class _GatherRows(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient and sends each rank its rows.

    This is the gather that keeps a distributed loss exact: rank ``r``'s features
    receive the gradient that *all* ranks' losses send them.
    """

    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        return gather_rows(x, layout)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_rows(grad.contiguous(), ctx.layout), None


def gather_rows_with_grad(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    if layout.world_size == 1:
        return x
    return _GatherRows.apply(x, layout)
