"""Forward kernels: row and column (max, sum of exp) statistics from one pass of tiles.

``_forward_kernel`` runs on a grid of (row block, column split). Each program walks its
column tiles once; every ``BLOCK_M x BLOCK_N`` tile of ``S = s * U V^T`` (fp32
accumulation, a loop over ``D`` in ``BLOCK_K`` chunks) feeds

* the rows' online (max, sum of exp over the negatives), kept in registers across the
  program's tiles and written once as a per-split partial;
* the columns' (max, sum of exp over the negatives) over the tile's rows, written to a
  ``row blocks x columns`` partials buffer (each entry exactly once, no atomics);
* the positives ``S[i, offset + i]`` of the rows whose positive column is in the tile.

``_combine_kernel`` then merges partials along their leading axis (row blocks for the
columns, splits for the rows). Every shift is a true maximum, so nothing underflows
whatever the logits are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from ._triton_utils import logits_tile, row_block

_COMBINE_BLOCK = 256


@triton.jit
def _forward_kernel(
    U,
    V,
    SCALE,
    ROW_MAX,
    ROW_NEG,
    COL_MAX,
    COL_NEG,
    DIAG,
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
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < b
    u_rows, u = row_block(U, rows, row_ok, D, stride_u, BLOCK_K, SINGLE_K)
    scale = tl.load(SCALE)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    diag = tl.zeros((BLOCK_M,), tl.float32)
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

        # Rows: online rescaling. A max of -inf only occurs on padding rows; shifting
        # those by 0 keeps them at sum 0 instead of NaN. The sums leave the positive out.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        e = tl.where(positive, 0.0, tl.exp(s - m_shift[:, None]))
        l_i = l_i * tl.exp(m_i - m_shift) + tl.sum(e, axis=1)
        m_i = m_new

        # Columns: complete over this row block, shifted by their own maximum.
        c_max = tl.max(s, axis=0)
        c_shift = tl.where(c_max == float("-inf"), 0.0, c_max)
        c_sum = tl.sum(tl.where(positive, 0.0, tl.exp(s - c_shift[None, :])), axis=0)
        part = pid_m.to(tl.int64) * n_cols + cols
        tl.store(COL_MAX + part, c_max, mask=col_ok)
        tl.store(COL_NEG + part, c_sum, mask=col_ok)

    part = pid_s.to(tl.int64) * b + rows
    tl.store(ROW_MAX + part, m_i, mask=row_ok)
    tl.store(ROW_NEG + part, l_i, mask=row_ok)
    pos_col = rows + diag_shift
    tl.store(DIAG + rows, diag, mask=row_ok & (pos_col >= n_begin) & (pos_col < n_end))


@triton.jit
def _combine_kernel(PART_MAX, PART_SUM, OUT_MAX, OUT_SUM, n_parts, n, BLOCK: tl.constexpr):
    """``(max, sum)`` over the leading axis of ``[n_parts, n]`` partials, online."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    run_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK,), tl.float32)
    part_max = PART_MAX + offs
    part_sum = PART_SUM + offs
    for _ in range(n_parts):
        p_max = tl.load(part_max, mask=ok, other=float("-inf"))
        p_sum = tl.load(part_sum, mask=ok, other=0.0)
        part_max += n
        part_sum += n
        new_max = tl.maximum(run_max, p_max)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + p_sum * tl.exp(p_max - shift)
        run_max = new_max
    tl.store(OUT_MAX + offs, run_max, mask=ok)
    tl.store(OUT_SUM + offs, run_sum, mask=ok)


def _combine(part_max, part_sum, out_max, out_sum, n_parts: int, n: int) -> None:
    if n:
        grid = (triton.cdiv(n, _COMBINE_BLOCK),)
        _combine_kernel[grid](
            PART_MAX=part_max,
            PART_SUM=part_sum,
            OUT_MAX=out_max,
            OUT_SUM=out_sum,
            n_parts=n_parts,
            n=n,
            BLOCK=_COMBINE_BLOCK,
        )


def forward_stats(block):
    """``(row_max, row_neg, col_max, col_neg, diag)`` of ``S = scale * uq @ vq^T``
    (:class:`palmtree.backends.base.ForwardStats`: the sums leave the positives out).

    ``block`` is a :class:`palmtree.backends.fused.Block`; column segments bound the
    partials buffer, column splits fill the grid when there are few row blocks.
    """
    uq, vq, scale, offset = block.uq, block.vq, block.scale, block.offset
    precision, plan = block.precision, block.plan
    b, dim = uq.shape
    B = vq.shape[0]
    f32 = dict(dtype=torch.float32, device=uq.device)
    bm, bn, bk = plan.block_m, plan.block_n, plan.block_k
    row_blocks = triton.cdiv(b, bm)
    seg = plan.segment_width(row_blocks, B)
    layout = [(c0, min(seg, B - c0)) for c0 in range(0, B, seg)]
    splits = [plan.splits(row_blocks, triton.cdiv(n, bn)) for _, n in layout]
    total_splits = sum(n_split for n_split, _ in splits)

    row_pmax = torch.empty(total_splits, b, **f32)
    row_psum = torch.empty(total_splits, b, **f32)
    col_pmax = torch.empty(row_blocks * min(seg, B), **f32)
    col_psum = torch.empty_like(col_pmax)
    col_max = torch.empty(B, **f32)
    col_neg = torch.empty(B, **f32)
    diag = torch.empty(b, **f32)
    first = 0
    for (c0, n), (n_split, tiles_per_split) in zip(layout, splits, strict=True):
        _forward_kernel[(row_blocks, n_split)](
            U=uq,
            V=vq[c0:],
            SCALE=scale,
            ROW_MAX=row_pmax[first:],
            ROW_NEG=row_psum[first:],
            COL_MAX=col_pmax,
            COL_NEG=col_psum,
            DIAG=diag,
            b=b,
            n_cols=n,
            D=dim,
            diag_shift=offset - c0,
            stride_u=uq.stride(0),
            stride_v=vq.stride(0),
            tiles_per_split=tiles_per_split,
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            SINGLE_K=bk >= dim,
            PRECISION=precision,
            INTERPRET=interpreting(),
            num_warps=plan.num_warps,
            num_stages=plan.num_stages,
        )
        _combine(col_pmax, col_psum, col_max[c0:], col_neg[c0:], row_blocks, n)
        first += n_split
    row_max = torch.empty(b, **f32)
    row_neg = torch.empty(b, **f32)
    _combine(row_pmax, row_psum, row_max, row_neg, total_splits, b)
    return row_max, row_neg, col_max, col_neg, diag
