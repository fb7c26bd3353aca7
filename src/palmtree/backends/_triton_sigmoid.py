"""Forward kernel of the sigmoid (SigLIP) loss: one pass of tiles, sums and maxima.

The loss is elementwise, so the forward needs no statistics to normalise anything: a grid
of (row block, column split) programs walks its ``S`` tiles (made exactly as the CLIP
forward makes them) and adds ``softplus(-z (S + bias))`` into two per-program partial
sums, the positives' and the negatives', which the host adds up (no atomics on the
sums, so the loss is deterministic). The maxima that the accuracies need are combined
with ``atomic_max``, whose result does not depend on the order. The backward is the
CLIP backward kernel with its sigmoid ``G`` (:mod:`._triton_backward`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from ._triton_utils import logits_tile, row_block
from .base import SigmoidStats


@triton.jit
def _softplus(y):
    """``log(1 + exp(y))`` without overflow, and with ``log1p``'s accuracy for small terms:
    ``log(w) * e / (w - 1)`` with ``w = 1 + e`` corrects the rounding of ``w``."""
    e = tl.exp(-tl.abs(y))
    w = 1.0 + e
    exact = w == 1.0
    log1p_e = tl.where(exact, e, tl.log(w) * e / tl.where(exact, 1.0, w - 1.0))
    return tl.maximum(y, 0.0) + log1p_e


@triton.jit
def _sigmoid_forward_kernel(
    U,
    V,
    SCALE,
    BIAS,
    PART_SUMS,
    ROW_MAX,
    COL_MAX,
    DIAG,
    ROW_IDS,
    COL_IDS,
    ROW_PMAX,
    COL_PMAX,
    b,
    n_cols,
    D,
    diag_shift,
    stride_u,
    stride_v,
    tiles_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SINGLE_K: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    LABELS: tl.constexpr,
    IGNORE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < b
    u_rows, u = row_block(U, rows, row_ok, D, stride_u, BLOCK_K, SINGLE_K)
    scale = tl.load(SCALE)
    bias = tl.load(BIAS)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    diag = tl.zeros((BLOCK_M,), tl.float32)
    pos_sum = tl.zeros((BLOCK_M,), tl.float32)
    neg_sum = tl.zeros((BLOCK_M,), tl.float32)
    if LABELS:
        row_ids = tl.load(ROW_IDS + rows, mask=row_ok, other=-2)
        pmax_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    n_begin = pid_s * tiles_per_split * BLOCK_N
    n_end = tl.minimum(n_begin + tiles_per_split * BLOCK_N, n_cols)
    for start in range(n_begin, n_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        acc = logits_tile(
            u,
            u_rows,
            V,
            cols,
            row_ok,
            col_ok,
            D,
            stride_v,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            SINGLE_K,
            PRECISION,
            INTERPRET,
        )
        ok = row_ok[:, None] & col_ok[None, :]
        s = tl.where(ok, acc * scale, float("-inf"))
        positive = ok & (cols[None, :] == rows[:, None] + diag_shift)
        diag += tl.sum(tl.where(positive, s, 0.0), axis=1)
        x = acc * scale + bias
        target = positive  # z = +1
        if LABELS:  # the other pairs of the rows' items (an extra negative's id is -1)
            col_ids = tl.load(COL_IDS + cols, mask=col_ok, other=-3)
            same = ok & (row_ids[:, None] == col_ids[None, :]) & (~positive)
            if IGNORE:  # out of the sum (softplus(-inf) = 0) and of the maxima
                s = tl.where(same, float("-inf"), s)
                x = tl.where(same, float("-inf"), x)
            else:
                target = positive | same
            at_target = tl.where(target, s, float("-inf"))
            pmax_i = tl.maximum(pmax_i, tl.max(at_target, axis=1))
            tl.atomic_max(COL_PMAX + cols, tl.max(at_target, axis=0), mask=col_ok, sem="relaxed")
        m_i = tl.maximum(m_i, tl.max(s, axis=1))
        tl.atomic_max(COL_MAX + cols, tl.max(s, axis=0), mask=col_ok, sem="relaxed")

        terms = _softplus(tl.where(target, -x, x))
        pos_sum += tl.sum(tl.where(target, terms, 0.0), axis=1)
        neg_sum += tl.sum(tl.where(ok & (~target), terms, 0.0), axis=1)

    tl.atomic_max(ROW_MAX + rows, m_i, mask=row_ok, sem="relaxed")
    if LABELS:
        tl.atomic_max(ROW_PMAX + rows, pmax_i, mask=row_ok, sem="relaxed")
    pos_col = rows + diag_shift
    tl.store(DIAG + rows, diag, mask=row_ok & (pos_col >= n_begin) & (pos_col < n_end))
    part = (pid_m * tl.num_programs(1) + pid_s) * 2
    tl.store(PART_SUMS + part, tl.sum(pos_sum, axis=0))
    tl.store(PART_SUMS + part + 1, tl.sum(neg_sum, axis=0))


def sigmoid_forward_stats(block, bias, targets=None) -> SigmoidStats:
    """:class:`palmtree.backends.base.SigmoidStats` of the sigmoid loss for a
    :class:`~.fused.Block`, with ``targets``' same-item pairs at ``z = +1`` or out of
    the sum (and, with labels, the largest logit at a positive per row and column)."""
    uq, vq, scale, offset = block.uq, block.vq, block.scale, block.offset
    precision, plan = block.precision, block.plan
    b, dim = uq.shape
    B = vq.shape[0]
    f32 = dict(dtype=torch.float32, device=uq.device)
    bm, bn = plan.block_m, plan.block_n
    row_blocks = triton.cdiv(b, bm)
    n_split, tiles_per_split = plan.splits(row_blocks, triton.cdiv(B, bn))
    part_sums = torch.empty(row_blocks * n_split * 2, **f32)
    stats = SigmoidStats.empty(B, uq.device, targets)
    stats.row_max, stats.diag = torch.full((b,), -torch.inf, **f32), torch.empty(b, **f32)
    labels = targets is not None
    if labels:
        stats.row_pos_max = stats.row_max.clone()
    _sigmoid_forward_kernel[(row_blocks, n_split)](
        U=uq,
        V=vq,
        SCALE=scale,
        BIAS=bias,
        PART_SUMS=part_sums,
        ROW_MAX=stats.row_max,
        COL_MAX=stats.col_max,
        DIAG=stats.diag,
        ROW_IDS=targets.rows(offset, b) if labels else part_sums,  # unread without labels
        COL_IDS=targets.columns if labels else part_sums,
        ROW_PMAX=stats.row_pos_max if labels else part_sums,
        COL_PMAX=stats.col_pos_max if labels else part_sums,
        b=b,
        n_cols=B,
        D=dim,
        diag_shift=offset,
        stride_u=uq.stride(0),
        stride_v=vq.stride(0),
        tiles_per_split=tiles_per_split,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=plan.block_k,
        SINGLE_K=plan.block_k >= dim,
        PRECISION=precision,
        INTERPRET=interpreting(),
        LABELS=labels,
        IGNORE=labels and targets.ignore,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    stats.pos_sum, stats.neg_sum = part_sums.view(-1, 2).sum(0).unbind()
    return stats
