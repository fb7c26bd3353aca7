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

With same-item labels (``LABELS``) each tile compares its rows' and its columns' ids:
ignored pairs (``IGNORE``) become ``-inf``; same-item positives also give each row's and
each column's sum of gaps to the own pair's similarity and the largest logit at a
target (:mod:`palmtree.clip_terms`), in partials beside the others (docs/kernels.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import interpreting
from ._triton_utils import logits_tile, row_block
from .base import ForwardStats

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
    ROW_IDS,
    COL_IDS,
    ROW_PAIR,
    COL_PAIR,
    ROW_GAP,
    ROW_PMAX,
    COL_GAP,
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
    if LABELS:
        row_ids = tl.load(ROW_IDS + rows, mask=row_ok, other=-2)
    if LABELS and not IGNORE:  # same-item positives: their sums too
        row_pair = tl.load(ROW_PAIR + rows, mask=row_ok, other=0.0)
        gap_i = tl.zeros((BLOCK_M,), tl.float32)
        pmax_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)

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
        if LABELS:  # the other pairs of the rows' items (an extra negative's id is -1)
            col_ids = tl.load(COL_IDS + cols, mask=col_ok, other=-3)
            same = ok & (row_ids[:, None] == col_ids[None, :]) & (~positive)
            if IGNORE:  # out of every sum and maximum
                s = tl.where(same, float("-inf"), s)
            else:
                # Each other target's similarity against its row's and its column's own
                # pair's (palmtree.clip_terms), and the largest logit at a target (the
                # accuracies); first, so that the product's tile is free before the exps.
                part = pid_m.to(tl.int64) * n_cols + cols
                gap_i += tl.sum(tl.where(same, row_pair[:, None] - acc, 0.0), axis=1)
                col_pair = tl.load(COL_PAIR + cols, mask=col_ok, other=0.0)
                c_gap = tl.sum(tl.where(same, col_pair[None, :] - acc, 0.0), axis=0)
                tl.store(COL_GAP + part, c_gap, mask=col_ok)
                at_target = tl.where(same | positive, s, float("-inf"))
                pmax_i = tl.maximum(pmax_i, tl.max(at_target, axis=1))
                tl.store(COL_PMAX + part, tl.max(at_target, axis=0), mask=col_ok)

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
    if LABELS and not IGNORE:
        tl.store(ROW_GAP + part, gap_i, mask=row_ok)
        tl.store(ROW_PMAX + part, pmax_i, mask=row_ok)
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


@dataclass
class _Partials:
    """One call's partial buffers: ``rows`` ``[splits, b]`` (max, sum) pairs, ``cols``
    ``[row blocks x segment]`` ones, and with same-item positives the targets' (sum of
    gaps, maximum) pairs beside each; ``None`` where a launch has no such sums."""

    row_max: torch.Tensor
    row_sum: torch.Tensor
    col_max: torch.Tensor
    col_sum: torch.Tensor
    row_gap: torch.Tensor | None = None
    row_pos: torch.Tensor | None = None
    col_gap: torch.Tensor | None = None
    col_pos: torch.Tensor | None = None

    @classmethod
    def make(cls, splits: int, b: int, col_entries: int, sums: bool, device) -> _Partials:
        f32 = dict(dtype=torch.float32, device=device)
        n = 4 if sums else 2
        rows = [torch.empty(splits, b, **f32) for _ in range(n)]
        cols = [torch.empty(col_entries, **f32) for _ in range(n)]
        return cls(rows[0], rows[1], cols[0], cols[1], *rows[2:], *cols[2:])


def _labels_args(targets, offset: int, c0: int, b: int, stand_in: torch.Tensor) -> dict:
    """The ids and pair similarities a launch on columns ``c0..`` reads (stand-ins,
    unread, without labels or in ignore mode: the kernel takes every pointer)."""
    ids = (targets.rows(offset, b), targets.columns[c0:]) if targets is not None else None
    pairs = None
    if targets is not None and not targets.ignore:
        pairs = (targets.pair_dot[offset : offset + b], targets.pair_dot[c0:])
    ids, pairs = ids or (stand_in, stand_in), pairs or (stand_in, stand_in)
    return dict(ROW_IDS=ids[0], COL_IDS=ids[1], ROW_PAIR=pairs[0], COL_PAIR=pairs[1])


def forward_stats(block, targets=None) -> ForwardStats:
    """:class:`palmtree.backends.base.ForwardStats` of ``S = scale * uq @ vq^T`` (the sums
    leave the positives out), with ``targets`` (:class:`palmtree.targets.Targets`) compared
    per tile: ignored pairs leave every sum and maximum; same-item positives also give
    their sums of gaps and their maxima.

    ``block`` is a :class:`palmtree.backends.fused.Block`; column segments bound the
    partials buffer, column splits fill the grid when there are few row blocks.
    """
    uq, vq, plan = block.uq, block.vq, block.plan
    b, B = uq.shape[0], vq.shape[0]
    sums = targets is not None and not targets.ignore
    row_blocks = triton.cdiv(b, plan.block_m)
    seg = plan.segment_width(row_blocks, B, values=4 if sums else 2)
    layout = [(c0, min(seg, B - c0)) for c0 in range(0, B, seg)]
    splits = [plan.splits(row_blocks, triton.cdiv(n, plan.block_n)) for _, n in layout]
    part = _Partials.make(sum(n for n, _ in splits), b, row_blocks * min(seg, B), sums, uq.device)
    stats = ForwardStats.empty(B, uq.device)
    stats.diag = torch.empty(b, dtype=torch.float32, device=uq.device)
    if sums:
        stats.col_pos_gap, stats.col_pos_max = (
            torch.empty_like(stats.col_max),
            stats.col_max.clone(),
        )
    first = 0
    for (c0, n), (n_split, tiles_per_split) in zip(layout, splits, strict=True):
        _launch(
            block, targets, part, stats.diag, c0, n, first, (row_blocks, n_split), tiles_per_split
        )
        _combine(part.col_max, part.col_sum, stats.col_max[c0:], stats.col_neg[c0:], row_blocks, n)
        if sums:
            stats.col_pos_gap[c0 : c0 + n] = part.col_gap[: row_blocks * n].view(-1, n).sum(0)
            stats.col_pos_max[c0 : c0 + n] = part.col_pos[: row_blocks * n].view(-1, n).amax(0)
        first += n_split
    stats.row_max, stats.row_neg = torch.empty_like(stats.diag), torch.empty_like(stats.diag)
    _combine(part.row_max, part.row_sum, stats.row_max, stats.row_neg, first, b)
    if sums:
        stats.row_pos_gap, stats.row_pos_max = part.row_gap.sum(0), part.row_pos.amax(0)
    return stats


def _launch(block, targets, part: _Partials, diag, c0: int, n: int, first: int, grid, per):
    """One forward launch on the columns ``[c0, c0 + n)``, its row partials from split ``first``."""
    uq, vq, plan = block.uq, block.vq, block.plan
    b, dim = uq.shape
    row_part = [x if x is None else x[first:] for x in (part.row_gap, part.row_pos)]
    stand_in = part.col_max  # for the pointers a launch does not read
    _forward_kernel[grid](
        U=uq,
        V=vq[c0:],
        SCALE=block.scale,
        ROW_MAX=part.row_max[first:],
        ROW_NEG=part.row_sum[first:],
        COL_MAX=part.col_max,
        COL_NEG=part.col_sum,
        DIAG=diag,
        **_labels_args(targets, block.offset, c0, b, stand_in),
        ROW_GAP=row_part[0] if row_part[0] is not None else stand_in,
        ROW_PMAX=row_part[1] if row_part[1] is not None else stand_in,
        COL_GAP=part.col_gap if part.col_gap is not None else stand_in,
        COL_PMAX=part.col_pos if part.col_pos is not None else stand_in,
        b=b,
        n_cols=n,
        D=dim,
        diag_shift=block.offset - c0,
        stride_u=uq.stride(0),
        stride_v=vq.stride(0),
        tiles_per_split=per,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k,
        SINGLE_K=plan.block_k >= dim,
        PRECISION=block.precision,
        INTERPRET=interpreting(),
        LABELS=targets is not None,
        IGNORE=targets is not None and targets.ignore,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
