"""Backward kernel: recompute ``S`` tiles and turn them into gradients, never storing them.

The gradient tile is symmetric in its two sides. With the *own* side the one a program
accumulates a gradient for and the *other* side the one it streams,

    G[x, y] = own_coef[x] exp(S[x, y] - own_shift[x]) + other_coef[y] exp(S[x, y] - other_shift[y])
    G[x, x + pos_shift] = pos_grad[x + pos_w_shift]

where ``pos_grad`` is formed by the protocol without cancellation and ``S`` at a
positive, where the temperature's terms read it, is the forward's
``diag[x + pos_w_shift]`` rather than the recomputed product (see
:mod:`palmtree.backends.base`). So one kernel serves the rows (own = ``U``) and the
columns (own = ``V``, the tile being ``S^T``). A program owns ``BLOCK_OWN`` rows of its
side and a range of the other side's tiles; for each tile it recomputes ``S`` as the
forward made it (``(U rows) x (V rows)^T`` in the forward's ``D`` chunks, transposed
afterwards when the program owns columns), builds ``G`` with the positives folded in and
adds ``G @ other`` to a ``BLOCK_OWN x D`` fp32 accumulator in registers (one product).
The row programs also sum the temperature's gradient, each similarity against its row's
and its column's positive (``PAIR_DOT``; base.py), from the same tile.
Programs that split the other side write separate partials the host sums, so the
result does not depend on scheduling. Optionally (``OTHER_GRAD``) the same program adds
``G^T @ own`` to the other side's gradient with fp32 atomics (one more product, in
``DV_BLOCK_K`` chunks of ``D``), which saves the second launch's recompute but makes
that gradient's summation order depend on scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import interpreting
from ._triton_utils import mma, round_operand


@triton.jit
def _grad_kernel(
    OWN,
    OTHER,
    SCALE,
    OWN_SHIFT,
    OWN_COEF,
    OTHER_SHIFT,
    OTHER_COEF,
    POS_GRAD,
    DIAG,
    PAIR_DOT,
    OWN_IDS,
    OTHER_IDS,
    OWN_REF,
    OTHER_REF,
    OWN_TARGET,
    OTHER_TARGET,
    BIAS,
    D_OWN,
    D_OTHER,
    DSCALE,
    DBIAS,
    n_own,
    n_other,
    D,
    n_pos,
    pos_shift,
    pos_w_shift,
    stride_own,
    stride_other,
    tiles_per_split,
    BLOCK_OWN: tl.constexpr,
    BLOCK_OTHER: tl.constexpr,
    BLOCK_D: tl.constexpr,
    S_BLOCK_K: tl.constexpr,
    DV_BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    OTHER_GRAD: tl.constexpr,
    WITH_DSCALE: tl.constexpr,
    OWN_IS_U: tl.constexpr,
    SIGMOID: tl.constexpr,
    LABELS: tl.constexpr,
    IGNORE: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_s = tl.program_id(1)
    own = pid_o * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
    own_ok = own < n_own
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    scale = tl.load(SCALE)
    own_rows = OWN + own.to(tl.int64)[:, None] * stride_own
    if (S_BLOCK_K >= BLOCK_D) or (OTHER_GRAD and (DV_BLOCK_K >= BLOCK_D)):
        x = tl.load(own_rows + dims[None, :], mask=own_ok[:, None] & dim_ok[None, :], other=0.0)
    o_shift = tl.load(OWN_SHIFT + own, mask=own_ok, other=float("inf"))
    o_coef = tl.load(OWN_COEF + own, mask=own_ok, other=0.0)
    pos_at = own + pos_w_shift
    pos_ok = own_ok & (pos_at >= 0) & (pos_at < n_pos)
    pos_g = tl.load(POS_GRAD + pos_at, mask=pos_ok, other=0.0)
    pos_s = tl.load(DIAG + pos_at, mask=pos_ok, other=0.0)
    if WITH_DSCALE and not SIGMOID:
        # <u, v> of each own row's pair (its positive is other row own + pos_shift).
        own_pair = tl.load(PAIR_DOT + own + pos_shift, mask=pos_ok, other=0.0)
    if LABELS:
        own_ids = tl.load(OWN_IDS + own, mask=own_ok, other=-2)
        if not IGNORE:  # same-item positives: what their terms are measured against
            own_t = tl.load(OWN_TARGET + own, mask=own_ok, other=0.0)
            if WITH_DSCALE and not SIGMOID:
                own_ref = tl.load(OWN_REF + own, mask=own_ok, other=0.0)

    d_own = tl.zeros((BLOCK_OWN, BLOCK_D), tl.float32)
    ds = tl.zeros((BLOCK_OWN,), tl.float32)
    db = tl.zeros((BLOCK_OWN,), tl.float32)
    t_begin = pid_s * tiles_per_split * BLOCK_OTHER
    t_end = tl.minimum(t_begin + tiles_per_split * BLOCK_OTHER, n_other)
    for start in range(t_begin, t_end, BLOCK_OTHER):
        oth = start + tl.arange(0, BLOCK_OTHER)
        oth_ok = oth < n_other
        oth_rows = OTHER + oth.to(tl.int64)[:, None] * stride_other
        y = tl.load(oth_rows + dims[None, :], mask=oth_ok[:, None] & dim_ok[None, :], other=0.0)
        # S is made as the forward made it, (U rows) x (V rows)^T in the same K chunks,
        # and transposed afterwards when this program owns columns.
        if OWN_IS_U:
            dot = tl.zeros((BLOCK_OWN, BLOCK_OTHER), tl.float32)
        else:
            dot = tl.zeros((BLOCK_OTHER, BLOCK_OWN), tl.float32)
        if S_BLOCK_K >= BLOCK_D:
            if OWN_IS_U:
                dot = mma(x, tl.trans(y), dot, PRECISION, INTERPRET)
            else:
                dot = mma(y, tl.trans(x), dot, PRECISION, INTERPRET)
        else:
            for k in range(0, D, S_BLOCK_K):
                kk = k + tl.arange(0, S_BLOCK_K)
                k_ok = kk < D
                a = tl.load(own_rows + kk[None, :], mask=own_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(oth_rows + kk[None, :], mask=oth_ok[:, None] & k_ok[None, :], other=0.0)
                if OWN_IS_U:
                    dot = mma(a, tl.trans(b), dot, PRECISION, INTERPRET)
                else:
                    dot = mma(b, tl.trans(a), dot, PRECISION, INTERPRET)
        if not OWN_IS_U:
            dot = tl.trans(dot)
        # Padding logits are -inf, so no exp overflows there and their G is exactly 0.
        ok = own_ok[:, None] & oth_ok[None, :]
        positive = ok & (oth[None, :] == own[:, None] + pos_shift)
        s = tl.where(ok, dot * scale, float("-inf"))
        if not SIGMOID:  # the softmax's positives must be the forward's (base.py)
            s = tl.where(positive, pos_s[:, None], s)
        target = positive
        if LABELS:  # the other pairs of the own rows' items (an extra negative's id is -1)
            oth_ids = tl.load(OTHER_IDS + oth, mask=oth_ok, other=-3)
            same = ok & (own_ids[:, None] == oth_ids[None, :]) & (~positive)
            if IGNORE:  # out of the loss: G is 0 there (sigmoid(-inf), exp(-inf))
                s = tl.where(same, float("-inf"), s)
            else:
                target = positive | same
        t_coef = tl.load(OTHER_COEF + oth, mask=oth_ok, other=0.0)
        if SIGMOID:
            # G = w_row * (-z) * sigmoid(-z x), x = S + bias, z = +1 at the positives. The
            # row weights are the own side's coefficients when it holds the rows.
            logit = s + tl.load(BIAS)
            sig = tl.sigmoid(tl.where(target, -logit, logit))
            w_row = o_coef[:, None] if OWN_IS_U else t_coef[None, :]
            g = w_row * tl.where(target, -sig, sig)
            if WITH_DSCALE:  # d/dscale = sum(G * (U V^T)): no division by a scale that may be 0
                ds += tl.sum(g * dot, axis=1)
                db += tl.sum(g, axis=1)
        else:
            # d/dscale (WITH_DSCALE) measures each similarity against its row's and its
            # column's positive (base.py): a peaked softmax's terms then share a sign
            # where sum(G * (U V^T)) would cancel to the loss. Each part is reduced as
            # soon as it is made, the columns' first: of the orders tried, the one that
            # spills on no launch that did not (docs/kernels.md).
            # With same-item positives every target's term counts, against the mean
            # similarity over its row's and its column's targets (OWN_REF, OTHER_REF),
            # the own pair's similarity standing at the diagonal (0 for a lone target).
            t_shift = tl.load(OTHER_SHIFT + oth, mask=oth_ok, other=float("inf"))
            p_oth = t_coef[None, :] * tl.exp(s - t_shift[None, :])
            if WITH_DSCALE:
                if LABELS and not IGNORE:
                    dot = tl.where(positive, own_pair[:, None], dot)
                    oth_ref = tl.load(OTHER_REF + oth, mask=oth_ok, other=0.0)
                    ds += tl.sum(p_oth * (dot - oth_ref[None, :]), axis=1)
                else:
                    oth_pair = tl.load(PAIR_DOT + oth, mask=oth_ok, other=0.0)
                    terms = tl.where(positive, 0.0, p_oth * (dot - oth_pair[None, :]))
                    ds += tl.sum(terms, axis=1)
            p_own = o_coef[:, None] * tl.exp(s - o_shift[:, None])
            if WITH_DSCALE:
                if LABELS and not IGNORE:
                    ds += tl.sum(p_own * (dot - own_ref[:, None]), axis=1)
                else:
                    terms = tl.where(positive, 0.0, p_own * (dot - own_pair[:, None]))
                    ds += tl.sum(terms, axis=1)
            g = p_own + p_oth
            g = tl.where(positive, pos_g[:, None], g)
            if LABELS and not IGNORE:  # each other target's weights, row's and column's
                oth_t = tl.load(OTHER_TARGET + oth, mask=oth_ok, other=0.0)
                g = tl.where(same, g - (own_t[:, None] + oth_t[None, :]), g)

        gq = round_operand(g, PRECISION)
        d_own = mma(gq, y, d_own, PRECISION, INTERPRET)
        if OTHER_GRAD:
            gq_t = tl.trans(gq)
            d_oth_rows = D_OTHER + oth.to(tl.int64)[:, None] * D
            if DV_BLOCK_K >= BLOCK_D:
                part = mma(
                    gq_t, x, tl.zeros((BLOCK_OTHER, BLOCK_D), tl.float32), PRECISION, INTERPRET
                )
                tl.atomic_add(
                    d_oth_rows + dims[None, :],
                    part * scale,
                    mask=oth_ok[:, None] & dim_ok[None, :],
                    sem="relaxed",
                )
            else:
                for k in range(0, D, DV_BLOCK_K):
                    kk = k + tl.arange(0, DV_BLOCK_K)
                    k_ok = kk < D
                    xk = tl.load(
                        own_rows + kk[None, :], mask=own_ok[:, None] & k_ok[None, :], other=0.0
                    )
                    part = mma(
                        gq_t,
                        xk,
                        tl.zeros((BLOCK_OTHER, DV_BLOCK_K), tl.float32),
                        PRECISION,
                        INTERPRET,
                    )
                    tl.atomic_add(
                        d_oth_rows + kk[None, :],
                        part * scale,
                        mask=oth_ok[:, None] & k_ok[None, :],
                        sem="relaxed",
                    )

    # D_OWN is [splits, n_own, D]: each split writes its own partial.
    split_base = pid_s.to(tl.int64) * n_own * D
    tl.store(
        D_OWN + split_base + own.to(tl.int64)[:, None] * D + dims[None, :],
        d_own * scale,
        mask=own_ok[:, None] & dim_ok[None, :],
    )
    if WITH_DSCALE:
        tl.store(DSCALE + pid_o * tl.num_programs(1) + pid_s, tl.sum(ds, axis=0))
        if SIGMOID:
            tl.store(DBIAS + pid_o * tl.num_programs(1) + pid_s, tl.sum(db, axis=0))


@dataclass(frozen=True)
class _Positives:
    """Where the positives of a launch are: own row ``x``'s is other row ``x + shift``;
    its ``G`` and forward logit are ``grad[x + w_shift]`` and ``diag[x + w_shift]`` (the
    sigmoid loss forms its own ``G``: any ``[b]`` tensor stands in)."""

    grad: torch.Tensor
    diag: torch.Tensor | None
    shift: int
    w_shift: int


@dataclass(frozen=True)
class _Side:
    """One side's same-item labels: its ids (:attr:`palmtree.targets.Targets.columns`)
    and, with same-item positives, the weight subtracted at each of its targets and the
    mean similarity over them (the temperature's reference; read on the rows' side)."""

    ids: torch.Tensor
    target: torch.Tensor | None = None
    ref: torch.Tensor | None = None


def _sides(targets, offset: int, b: int, terms=None):
    """``(rows, columns)`` :class:`_Side` of a call's labels (``None`` without labels);
    ``terms``: the CLIP pass's :class:`~palmtree.backends.base.GradientTerms`."""
    if targets is None:
        return None
    rows, cols = targets.rows(offset, b), targets.columns
    if terms is None or targets.ignore:
        return _Side(rows), _Side(cols)
    return _Side(rows, terms.row_target, terms.row_ref), _Side(
        cols, terms.col_target, terms.col_ref
    )


def _own_grad(
    own,
    other,
    scale,
    own_terms,
    other_terms,
    pos: _Positives,
    *,
    precision,
    plan,
    own_is_u: bool,
    d_other=None,
    with_dscale=False,
    bias=None,
    pair_dot=None,
    labels=None,
    ignore=False,
):
    """``scale * G @ other`` for every row of ``own``, and ``dscale`` (base.py).

    ``own_terms``/``other_terms`` are the ``(shift, coef)`` pairs of the two sides;
    ``own_is_u`` says whether ``own`` holds the image rows (else the text rows).
    With ``d_other``, the same programs also add ``scale * G^T @ own`` into it atomically.
    With ``bias`` (a 0-dim tensor) ``G`` is the sigmoid loss's, the coefficients being the
    row weights, and ``dscale = sum(G * own other^T)``; without it the softmax's ``dscale``
    reads ``pair_dot``. ``labels``: the ``(own, other)`` :class:`_Side` of same-item
    labels, whose other pairs are positives or, with ``ignore``, out of the loss. Returns
    ``(grad, dscale, dbias)`` (the sums ``None`` unless ``with_dscale``; ``dbias`` only
    with ``bias``).
    """
    n_own, dim = own.shape
    f32 = dict(dtype=torch.float32, device=own.device)
    blocks = triton.cdiv(n_own, plan.bwd_block_m)
    n_split, tiles_per_split = plan.splits(blocks, triton.cdiv(other.shape[0], plan.bwd_block_n))
    partials = torch.empty(n_split, n_own, dim, **f32)
    dscale = torch.empty(blocks * n_split if with_dscale else 1, **f32)
    dbias = torch.empty_like(dscale)
    _grad_kernel[(blocks, n_split)](
        **_inputs(own, other, scale, own_terms, other_terms, pos, bias, pair_dot),
        **_label_inputs(labels, pos.grad),
        D_OWN=partials,
        D_OTHER=d_other if d_other is not None else partials,
        DSCALE=dscale,
        DBIAS=dbias,
        **_sizes(own, other, pos),
        tiles_per_split=tiles_per_split,
        **_tiles(plan, precision),
        OTHER_GRAD=d_other is not None,
        WITH_DSCALE=with_dscale,
        OWN_IS_U=own_is_u,
        SIGMOID=bias is not None,
        LABELS=labels is not None,
        IGNORE=ignore,
    )
    grad = partials[0] if n_split == 1 else partials.sum(0)
    if not with_dscale:
        return grad, None, None
    return grad, dscale.sum(), (dbias.sum() if bias is not None else None)


def _inputs(own, other, scale, own_terms, other_terms, pos: _Positives, bias, pair_dot) -> dict:
    """The tensors :func:`_grad_kernel` reads. One that a launch lacks (``diag``,
    ``pair_dot``, ``bias``) is stood in for by one it has: the kernel takes every pointer
    on every launch, and its constexpr flags keep the stand-ins unread."""
    return dict(
        OWN=own,
        OTHER=other,
        SCALE=scale,
        OWN_SHIFT=own_terms[0],
        OWN_COEF=own_terms[1],
        OTHER_SHIFT=other_terms[0],
        OTHER_COEF=other_terms[1],
        POS_GRAD=pos.grad,
        DIAG=pos.diag if pos.diag is not None else pos.grad,  # unread without a diag
        PAIR_DOT=pair_dot if pair_dot is not None else pos.grad,  # read only by dscale
        BIAS=bias if bias is not None else scale,
    )


def _label_inputs(labels, stand_in: torch.Tensor) -> dict:
    """The labels' tensors :func:`_grad_kernel` reads (stand-ins, unread, where a launch
    has none)."""
    own, other = labels if labels is not None else (_Side(stand_in), _Side(stand_in))

    def given(x):
        return x if x is not None else stand_in

    return dict(
        OWN_IDS=own.ids,
        OTHER_IDS=other.ids,
        OWN_REF=given(own.ref),
        OTHER_REF=given(other.ref),
        OWN_TARGET=given(own.target),
        OTHER_TARGET=given(other.target),
    )


def _sizes(own, other, pos: _Positives) -> dict:
    """The sizes, strides and positive shifts of a launch: runtime integers, not
    constexprs (those are :func:`_tiles`' and the flags)."""
    return dict(
        n_own=own.shape[0],
        n_other=other.shape[0],
        D=own.shape[1],
        n_pos=pos.grad.shape[0],
        pos_shift=pos.shift,
        pos_w_shift=pos.w_shift,
        stride_own=own.stride(0),
        stride_other=other.stride(0),
    )


def _tiles(plan, precision: str) -> dict:
    """The tile sizes, precision and launch options the plan gives the backward kernel."""
    return dict(
        BLOCK_OWN=plan.bwd_block_m,
        BLOCK_OTHER=plan.bwd_block_n,
        BLOCK_D=plan.block_d,
        S_BLOCK_K=min(plan.block_k, plan.block_d),
        DV_BLOCK_K=min(plan.bwd_block_k, plan.block_d),
        PRECISION=precision,
        INTERPRET=interpreting(),
        num_warps=plan.bwd_num_warps,
        num_stages=plan.bwd_num_stages,
    )


def backward_grads(block, terms):
    """``(dU, dV_partial, dscale)`` of the base.py contract for a :class:`~.fused.Block` and
    fp32 :class:`palmtree.backends.base.GradientTerms` (their ``targets`` compared per tile)."""
    rows, cols = (terms.row_shift, terms.row_coef), (terms.col_shift, terms.col_coef)
    labels = _sides(terms.targets, block.offset, block.uq.shape[0], terms)
    du, dv, dscale, _ = _both_sides(
        block, rows, cols, terms.pos_grad, terms.diag, terms.targets, labels, terms.pair_dot
    )
    return du, dv, dscale


def sigmoid_backward_grads(block, bias, row_weight, targets=None):
    """``(dU, dV_partial, dscale, dbias)`` of the sigmoid contract (base.SigmoidKernels),
    with ``targets``' same-item pairs at ``z = +1`` or out of the sum.

    The loss is elementwise: the positives need no forward value, only their place."""
    unused = torch.zeros(block.vq.shape[0], dtype=torch.float32, device=block.vq.device)
    rows, cols = (row_weight, row_weight), (unused, unused)
    labels = _sides(targets, block.offset, block.uq.shape[0])
    return _both_sides(block, rows, cols, row_weight, None, targets, labels, bias=bias)


def _both_sides(block, rows, cols, pos_grad, diag, targets, labels, pair_dot=None, bias=None):
    """dU from programs owning rows, dV from programs owning columns (or atomically).

    Row ``i``'s positive is column ``offset + i``; column ``j``'s is row ``j - offset``,
    whose weight and forward logit are indexed by that row. ``labels``: the rows' and
    the columns' :class:`_Side` (``None`` without labels).
    """
    uq, vq, scale, offset = block.uq, block.vq, block.scale, block.offset
    common = dict(precision=block.precision, plan=block.plan, bias=bias, pair_dot=pair_dot)
    common["ignore"] = targets is not None and targets.ignore
    row_pos = _Positives(pos_grad, diag, offset, 0)
    d_other = None
    if block.plan.bwd_mode == "atomic":
        d_other = torch.zeros(vq.shape, dtype=torch.float32, device=vq.device)
    du, dscale, dbias = _own_grad(
        uq,
        vq,
        scale,
        rows,
        cols,
        row_pos,
        own_is_u=True,
        d_other=d_other,
        with_dscale=True,
        labels=labels,
        **common,
    )
    if d_other is not None:
        return du, d_other, dscale, dbias
    col_pos = _Positives(pos_grad, diag, -offset, -offset)
    flipped = None if labels is None else labels[::-1]
    dv, _, _ = _own_grad(
        vq, uq, scale, cols, rows, col_pos, own_is_u=False, labels=flipped, **common
    )
    return du, dv, dscale, dbias
