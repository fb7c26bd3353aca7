"""The ``chunked`` passes with same-item labels (:class:`palmtree.targets.Targets`).

The same column chunks as :mod:`.chunked`; each chunk compares its rows' ids with its
columns' ids (a ``b x chunk`` mask, never ``B x B``). Ignored pairs leave every sum and
maximum (their logits become ``-inf``, their ``G`` 0); same-item positives stay in the
softmaxes and add their similarities to the sums the targets' means come from
(:mod:`palmtree.clip_terms`). The extra negatives' columns are never the same item.
Without labels :mod:`.chunked` runs its own loops, untouched.

The CLIP passes compare small fp32 keys of the ids (:func:`_keys`) into an fp32 ``0/1``
mask in a reused buffer and apply it with fp32 arithmetic (``add`` with ``alpha``,
``addcmul``, ``addcdiv``), each exact: in eager PyTorch on a CPU a boolean mask costs
several fp32 passes to form and to apply (``masked_fill``, ``where``, a product with a
``bool``), which made most of the labels' cost (docs/benchmarks.md, "Targets").
"""

from __future__ import annotations

import torch

from ..precision import cast_operand, mm
from ..targets import Targets
from .base import ForwardStats, GradientTerms, SigmoidStats, zero_grads
from .chunks import add_products, column_chunks, diag_slice, reuse_buffer, without_positives

_NEG_INF = float("-inf")
#: Bytes of ``b x chunk`` temporaries these passes hold at once: the backward's four fp32
#: buffers (product, gradient, scratch, the temperature's terms; the masks and the
#: targets' weights take the scratch's and the terms' places once they are free), the
#: forward's three (product, mask, differences). The plain passes' budget, so the same
#: chunks.
_PER_LOGIT = 16
#: The sigmoid passes' (boolean masks, and products and logits not formed in place): some
#: 20 to 28 bytes counted, this with a margin (their chunks as before).
_SIGMOID_PER_LOGIT = 64
#: Subtracted from ``U V^T`` off the targets for the targets' maxima: never the largest
#: where a row or column has a target (``|<u_i, v_j>|`` is about 1 at most), and at or
#: below ``-_BIG / 2`` where it has none (``-inf`` then).
_BIG = 2.0**100


def _ids(targets: Targets, offset: int, b: int):
    """``(rows [b], columns [B + N], table)``: the :attr:`Targets.columns` ids plus one (the
    extra negatives' ``-1`` becomes 0, which no row has) and the table :func:`_keys` fills."""
    columns = targets.columns + 1
    table = torch.empty(columns.shape[0] + 1, dtype=torch.float32, device=columns.device)
    return columns[offset : offset + b], columns, table


def _keys(ids, c0: int, c1: int):
    """``(rows [b, 1], columns [1, c])``: fp32 keys of one chunk, equal exactly where the
    ids are. Each chunk column writes its place (below ``c``: exact in fp32 for any ``B``)
    at its id, columns of one id keep one of them; the rows read their ids' (``-1``: not
    in the chunk). An fp32 comparison writes an fp32 mask in one fast pass; int64 ids
    compare into a boolean, and a boolean mask is slow to apply."""
    rows, columns, table = ids
    chunk = columns[c0:c1]
    table.fill_(-1.0)
    table[chunk] = torch.arange(c1 - c0, dtype=torch.float32, device=table.device)
    return table[rows][:, None], table[chunk][None, :]


def _mask(keys, out: torch.Tensor, where, equal: bool, own=None):
    """One chunk's fp32 mask (:func:`_keys`), in ``out``: 1 where the rows' and the
    columns' ids are equal (``equal``) or differ, 0 elsewhere; ``own`` at the rows' own
    pairs (``where``), if given (else as their ids say: equal)."""
    mask = (torch.eq if equal else torch.ne)(keys[0], keys[1], out=out)
    if own is not None and where is not None:
        mask[where[0], where[1]] = own
    return mask


def _scaled_max(m: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The targets' maxima of ``S`` from those of ``U V^T``: ``fl(scale * max dot)`` is
    ``max fl(scale * dot)`` bit for bit (``scale >= 0``, rounding is monotonic); ``-inf``
    where there was no target (no ``0 * -inf``)."""
    return torch.where(m <= -_BIG / 2, _NEG_INF, m * scale)


def _safe(shift: torch.Tensor) -> torch.Tensor:
    """A shift for ``exp`` where every entry may have been ignored (``-inf``): 0 there."""
    return torch.where(torch.isinf(shift), torch.zeros_like(shift), shift)


def _same(targets: Targets, row_ids, offset: int, b: int, c0: int, c1: int):
    """``(same, where)`` of one chunk: the entries of the rows' items with the rows' own
    pairs cleared, and where those own pairs are (:func:`.chunks.diag_slice`)."""
    same = targets.same(row_ids, c0, c1)
    where = diag_slice(offset, b, c0, c1, row_ids.device)
    if where is not None:
        same[where[0], where[1]] = False
    return same, where


def forward_with_targets(u, v, scale, offset, precision, chunk_size, targets: Targets):
    """:meth:`.chunked.ChunkedKernels.forward` with labels (module docstring)."""
    b, big = u.shape[0], v.shape[0]
    stats = ForwardStats.empty(big, u.device, targets)
    f32 = dict(dtype=torch.float32, device=u.device)
    positive = not targets.ignore
    if b == 0:
        return stats
    if positive:
        stats.row_pos_gap = torch.zeros(b, **f32)
    uq, ids = cast_operand(u, precision), _ids(targets, offset, b)
    row_max = torch.full((b,), _NEG_INF, **f32)
    row_neg, diag = torch.zeros(b, **f32), torch.empty(b, **f32)
    row_pos_max = torch.full((b,), _NEG_INF, **f32)  # of U V^T, scaled after the loop
    scratch = spare = None
    for c0, c1 in column_chunks(b, big, chunk_size, u.device, _PER_LOGIT):
        dot = mm(uq, cast_operand(v[c0:c1], precision).T, precision)
        where, keys = diag_slice(offset, b, c0, c1, u.device), _keys(ids, c0, c1)
        scratch, spare = reuse_buffer(scratch, dot), reuse_buffer(spare, dot)
        if positive:
            sums = (targets.pair_dot, offset, c0, c1)
            chunk_max = _add_target_sums(stats, sums, dot, keys, where, scratch, spare)
            torch.maximum(row_pos_max, chunk_max, out=row_pos_max)
            s = dot.mul_(scale)
        else:  # ignored: out of every sum and maximum, s - 0 / 1 or s - 1 / 0 = -inf
            ignored = _mask(keys, scratch, where, equal=True, own=0.0)
            kept = _mask(keys, spare, where, equal=False, own=1.0)
            s = dot.mul_(scale).addcdiv_(ignored, kept, value=-1.0)
        if where is not None:
            diag[where[0]] = s[where[0], where[1]]
        cmax = s.amax(0)
        stats.col_max[c0:c1] = cmax
        e = without_positives(torch.sub(s, _safe(cmax), out=scratch).exp_(), where)
        stats.col_neg[c0:c1] = e.sum(0)
        new_max = torch.maximum(row_max, s.amax(1))
        e = without_positives(torch.sub(s, _safe(new_max)[:, None], out=scratch).exp_(), where)
        row_neg = row_neg * torch.exp(row_max - _safe(new_max)) + e.sum(1)
        row_max = new_max
    stats.row_max, stats.row_neg, stats.diag = row_max, row_neg, diag
    if positive:
        stats.row_pos_max = _scaled_max(row_pos_max, scale)
        stats.col_pos_max = _scaled_max(stats.col_pos_max, scale)
    return stats


def _add_target_sums(stats, sums, dot, keys, where, scratch, spare) -> torch.Tensor:
    """One chunk's part of the targets' sums: each target's difference to its row's and
    its column's own pair's similarity (``sums``: ``pair_dot``, the rows' offset and the
    chunk's columns), one difference each (their means are subtracted from logits of size
    ``scale``); and the largest ``U V^T`` at a target, per column into
    ``stats.col_pos_max`` and per row returned (both unscaled, :func:`_scaled_max`)."""
    pair_dot, offset, c0, c1 = sums
    other = _mask(keys, scratch, where, equal=False)  # 0 at every target, own pairs too
    at_target = torch.add(dot, other, alpha=-_BIG, out=spare)  # dot there, ~ -_BIG off
    stats.col_pos_max[c0:c1] = at_target.amax(0)
    row_pos_max = at_target.amax(1)
    # Each difference d at a target, d - d * 1 = 0 exactly off them: no second mask.
    gap = torch.sub(pair_dot[offset : offset + dot.shape[0], None], dot, out=spare)
    gap = without_positives(gap.addcmul_(gap, other, value=-1.0), where)
    stats.row_pos_gap += gap.sum(1)
    gap = torch.sub(pair_dot[None, c0:c1], dot, out=spare)
    gap = without_positives(gap.addcmul_(gap, other, value=-1.0), where)
    stats.col_pos_gap[c0:c1] = gap.sum(0)
    return row_pos_max


def backward_with_targets(u, v, scale, offset, precision, chunk_size, terms: GradientTerms):
    """:meth:`.chunked.ChunkedKernels.backward` with labels: ``G`` is 0 at ignored pairs;
    with same-item positives it subtracts ``row_target[i] + col_target[j]`` at every
    target off the diagonal, and ``dscale`` measures each similarity against its row's
    and its column's mean over their targets (``row_ref``, ``col_ref``), the own pair's
    similarity standing at the diagonal (so a row with one target adds 0 there)."""
    b, big = u.shape[0], v.shape[0]
    du, dv, dscale = zero_grads(u, v)
    if b == 0:
        return du, dv, dscale
    targets, positive = terms.targets, not terms.targets.ignore
    uq, ids = cast_operand(u, precision), _ids(targets, offset, b)
    own_dot = terms.pair_dot[offset : offset + b]
    row_ref, col_ref = (terms.row_ref, terms.col_ref) if positive else (own_dot, terms.pair_dot)
    g = scratch = tmp = None
    for c0, c1 in column_chunks(b, big, chunk_size, u.device, _PER_LOGIT):
        vq = cast_operand(v[c0:c1], precision)
        dot = mm(uq, vq.T, precision)
        where, keys = diag_slice(offset, b, c0, c1, u.device), _keys(ids, c0, c1)
        g, scratch = reuse_buffer(g, dot), reuse_buffer(scratch, dot)
        tmp = reuse_buffer(tmp, dot)
        s = torch.mul(dot, scale, out=g)
        if where is not None:
            s[where[0], where[1]] = terms.diag[where[0]]
        p_col = torch.sub(s, terms.col_shift[None, c0:c1], out=scratch).exp_()
        p_col.mul_(terms.col_coef[None, c0:c1])
        p_row = s.sub_(terms.row_shift[:, None]).exp_().mul_(terms.row_coef[:, None])
        if positive:  # every target's term counts; the own pair's is 0 when it is alone
            if where is not None:
                dot[where[0], where[1]] = own_dot[where[0]]
            keep = None
        else:  # the own pair's term is left out, as without labels
            kept = _mask(keys, tmp, where, equal=False, own=1.0)
            p_row.mul_(kept)
            p_col.mul_(kept)
            keep = where
        row_terms = torch.sub(dot, row_ref[:, None], out=tmp).mul_(p_row)
        dscale += without_positives(row_terms, keep).sum()
        col_terms = dot.sub_(col_ref[None, c0:c1]).mul_(p_col)
        dscale += without_positives(col_terms, keep).sum()
        del dot, col_terms  # in tf32/bf16 modes the rounded gradient takes this memory
        g = p_row.add_(p_col)
        if where is not None:
            g[where[0], where[1]] = terms.pos_grad[where[0]]
        if positive:  # the other targets, in the freed buffers: g - target * 1, or g - 0
            same = _mask(keys, scratch, where, equal=True, own=0.0)
            target = torch.add(terms.row_target[:, None], terms.col_target[None, c0:c1], out=tmp)
            g.addcmul_(target, same, value=-1.0)
        add_products(du, dv[c0:c1], cast_operand(g, precision), uq, vq, precision)
    return du.mul_(scale), dv.mul_(scale), dscale


def _sigmoid_masks(targets: Targets, row_ids, offset, b, c0, c1):
    """``(where, positive, dropped)`` of one chunk: its own pairs (:func:`_same`), the
    ``z = +1`` entries and the entries that leave the sum (``None``: none do)."""
    same, where = _same(targets, row_ids, offset, b, c0, c1)
    positive, dropped = (torch.zeros_like(same), same) if targets.ignore else (same, None)
    if where is not None:
        positive[where[0], where[1]] = True
    return where, positive, dropped


def sigmoid_forward_with_targets(u, v, scale, bias, offset, precision, chunk_size, targets):
    """:meth:`.chunked.ChunkedKernels.sigmoid_forward` with labels: ``z = +1`` at every
    same-item pair (positive), or those off the diagonal out of the sum (ignore)."""
    b, big = u.shape[0], v.shape[0]
    stats = SigmoidStats.empty(big, u.device, targets)
    f32 = dict(dtype=torch.float32, device=u.device)
    if b == 0:
        return stats
    uq, row_labels = cast_operand(u, precision), targets.rows(offset, b)
    row_max, row_pos_max = (torch.full((b,), _NEG_INF, **f32) for _ in range(2))
    diag = torch.empty(b, **f32)
    pos, neg = torch.zeros((), **f32), torch.zeros((), **f32)
    for c0, c1 in column_chunks(b, big, chunk_size, u.device, _SIGMOID_PER_LOGIT):
        dot = mm(uq, cast_operand(v[c0:c1], precision).T, precision)
        where, positive, dropped = _sigmoid_masks(targets, row_labels, offset, b, c0, c1)
        s = dot * scale
        if dropped is not None:
            s.masked_fill_(dropped, _NEG_INF)
        if where is not None:
            diag[where[0]] = s[where[0], where[1]]
        at_positive = s.masked_fill(~positive, _NEG_INF)
        row_max = torch.maximum(row_max, s.amax(1))
        row_pos_max = torch.maximum(row_pos_max, at_positive.amax(1))
        stats.col_max[c0:c1] = s.amax(0)
        stats.col_pos_max[c0:c1] = at_positive.amax(0)
        x = torch.addcmul(bias, dot, scale)
        t = torch.logaddexp(torch.where(positive, -x, x), torch.zeros((), **f32))
        if dropped is not None:
            t.masked_fill_(dropped, 0.0)
        pos += t.masked_fill(~positive, 0.0).sum()
        neg += t.masked_fill_(positive, 0.0).sum()
    stats.pos_sum, stats.neg_sum, stats.diag = pos, neg, diag
    stats.row_max, stats.row_pos_max = row_max, row_pos_max
    return stats


def sigmoid_backward_with_targets(
    u, v, scale, bias, offset, precision, chunk_size, row_weight, targets
):
    """:meth:`.chunked.ChunkedKernels.sigmoid_backward` with labels: ``G = -w
    sigmoid(-x)`` at the ``z = +1`` entries, ``w sigmoid(x)`` at the others, 0 where
    dropped; each formed directly, so neither cancels."""
    b, big = u.shape[0], v.shape[0]
    du, dv, dscale = zero_grads(u, v)
    dbias = dscale.clone()
    if b == 0:
        return du, dv, dscale, dbias
    uq, row_labels = cast_operand(u, precision), targets.rows(offset, b)
    for c0, c1 in column_chunks(b, big, chunk_size, u.device, _SIGMOID_PER_LOGIT):
        vq = cast_operand(v[c0:c1], precision)
        dot = mm(uq, vq.T, precision)
        _, positive, dropped = _sigmoid_masks(targets, row_labels, offset, b, c0, c1)
        x = torch.addcmul(bias, dot, scale)
        g = torch.where(positive, -torch.sigmoid(-x), torch.sigmoid(x)).mul_(row_weight[:, None])
        if dropped is not None:
            g.masked_fill_(dropped, 0.0)
        dscale += (g * dot).sum()
        dbias += g.sum()
        add_products(du, dv[c0:c1], cast_operand(g, precision), uq, vq, precision)
    return du.mul_(scale), dv.mul_(scale), dscale, dbias
