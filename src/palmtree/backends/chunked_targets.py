"""The ``chunked`` passes with same-item labels (:class:`palmtree.targets.Targets`).

The same column chunks as :mod:`.chunked`; each chunk compares its rows' ids with its
columns' ids (a ``b x chunk`` boolean, never ``B x B``). Ignored pairs leave every sum and
maximum (their logits become ``-inf``, their ``G`` 0); same-item positives stay in the
softmaxes and add their similarities to the sums the targets' means come from
(:mod:`palmtree.clip_terms`). The extra negatives' columns are never the same item.
Without labels :mod:`.chunked` runs its own loops, untouched.
"""

from __future__ import annotations

import torch

from ..precision import cast_operand, mm
from ..targets import Targets
from .base import ForwardStats, GradientTerms, SigmoidStats, zero_grads
from .chunks import add_products, column_chunks, diag_slice, reuse_buffer, without_positives

_NEG_INF = float("-inf")
#: Bytes of ``b x chunk`` temporaries these passes hold at once (masks, products, their
#: differences and exponentials: about four times the plain passes' in-place buffers),
#: so that the default chunks keep the same memory budget.
_PER_LOGIT = 64


def _chunk_masks(targets: Targets, row_ids, offset: int, b: int, c0: int, c1: int):
    """``(diag, same_off)`` of one chunk: the rows' own pairs' entries, and the other
    entries of the rows' items."""
    cols = torch.arange(c0, c1, device=row_ids.device)
    rows = torch.arange(offset, offset + b, device=row_ids.device)
    diag = rows[:, None] == cols[None, :]
    return diag, targets.same(row_ids, c0, c1) & ~diag


def _own_logits(diag: torch.Tensor, s: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """``diag`` with the chunk's own-pair logits put in (static shapes, for the compiler)."""
    return torch.where(own.any(1), s.masked_fill(~own, 0.0).sum(1), diag)


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
    stats = ForwardStats.empty(big, u.device)
    f32 = dict(dtype=torch.float32, device=u.device)
    positive = not targets.ignore
    if positive:
        stats.row_pos_gap, stats.row_pos_max = torch.zeros(b, **f32), torch.empty(0, **f32)
        stats.col_pos_gap = torch.zeros(big, **f32)
        stats.col_pos_max = torch.full((big,), _NEG_INF, **f32)
    if b == 0:
        return stats
    uq, row_ids = cast_operand(u, precision), targets.rows(offset, b)
    row_max = torch.full((b,), _NEG_INF, **f32)
    row_neg, diag = torch.zeros(b, **f32), torch.empty(b, **f32)
    row_pos_max = torch.full((b,), _NEG_INF, **f32)
    scratch = None
    for c0, c1 in column_chunks(b, big, chunk_size, u.device, _PER_LOGIT):
        dot = mm(uq, cast_operand(v[c0:c1], precision).T, precision)
        same_off, where = _same(targets, row_ids, offset, b, c0, c1)
        scratch = reuse_buffer(scratch, dot)
        if positive:
            s = dot * scale
            _add_target_sums(stats, targets, s, dot, same_off, where, offset, c0, c1, scratch)
            row_pos_max = torch.maximum(row_pos_max, stats.row_pos_max)
        else:  # ignored: out of every sum and maximum
            s = dot.mul_(scale).masked_fill_(same_off, _NEG_INF)
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
        stats.row_pos_max = row_pos_max
    return stats


def _add_target_sums(stats, targets, s, dot, same_off, where, offset, c0, c1, scratch):
    """One chunk's part of the targets' sums: the largest logit at a target (its row's
    into ``stats.row_pos_max``, as this chunk's), and each target's difference to its
    row's and its column's own pair's similarity, one difference each: their means are
    subtracted from logits of size ``scale``."""
    b = s.shape[0]
    at_target = s.masked_fill(~same_off, _NEG_INF)
    if where is not None:
        at_target[where[0], where[1]] = s[where[0], where[1]]
    stats.row_pos_max = at_target.amax(1)
    stats.col_pos_max[c0:c1] = at_target.amax(0)
    gap = torch.sub(targets.pair_dot[offset : offset + b, None], dot, out=scratch)
    stats.row_pos_gap += gap.mul_(same_off).sum(1)
    gap = torch.sub(targets.pair_dot[None, c0:c1], dot, out=scratch)
    stats.col_pos_gap[c0:c1] = gap.mul_(same_off).sum(0)


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
    uq, row_ids = cast_operand(u, precision), targets.rows(offset, b)
    own_dot = terms.pair_dot[offset : offset + b]
    row_ref, col_ref = (terms.row_ref, terms.col_ref) if positive else (own_dot, terms.pair_dot)
    g = scratch = tmp = None
    for c0, c1 in column_chunks(b, big, chunk_size, u.device, _PER_LOGIT):
        vq = cast_operand(v[c0:c1], precision)
        dot = mm(uq, vq.T, precision)
        same_off, where = _same(targets, row_ids, offset, b, c0, c1)
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
            p_row.masked_fill_(same_off, 0.0)
            p_col.masked_fill_(same_off, 0.0)
            keep = where
        row_terms = torch.sub(dot, row_ref[:, None], out=tmp).mul_(p_row)
        dscale += without_positives(row_terms, keep).sum()
        col_terms = dot.sub_(col_ref[None, c0:c1]).mul_(p_col)
        dscale += without_positives(col_terms, keep).sum()
        g = p_row.add_(p_col)
        if where is not None:
            g[where[0], where[1]] = terms.pos_grad[where[0]]
        if positive:
            target = torch.add(terms.row_target[:, None], terms.col_target[None, c0:c1], out=tmp)
            g.sub_(target.mul_(same_off))
        add_products(du, dv[c0:c1], cast_operand(g, precision), uq, vq, precision)
    return du.mul_(scale), dv.mul_(scale), dscale


def _sigmoid_masks(targets: Targets, row_labels, offset, b, c0, c1):
    """``(own, positive, dropped)`` of one chunk: the diagonal, the ``z = +1`` entries and
    the entries that leave the sum."""
    own, same_off = _chunk_masks(targets, row_labels, offset, b, c0, c1)
    if targets.ignore:
        return own, own, same_off
    return own, own | same_off, torch.zeros_like(own)


def sigmoid_forward_with_targets(u, v, scale, bias, offset, precision, chunk_size, targets):
    """:meth:`.chunked.ChunkedKernels.sigmoid_forward` with labels: ``z = +1`` at every
    same-item pair (positive), or those off the diagonal out of the sum (ignore)."""
    b, big = u.shape[0], v.shape[0]
    stats = SigmoidStats.empty(big, u.device)
    f32 = dict(dtype=torch.float32, device=u.device)
    stats.col_pos_max = torch.full((big,), _NEG_INF, **f32)
    if b == 0:
        stats.row_pos_max = torch.empty(0, **f32)
        return stats
    uq, row_labels = cast_operand(u, precision), targets.rows(offset, b)
    row_max, row_pos_max = (torch.full((b,), _NEG_INF, **f32) for _ in range(2))
    diag = torch.empty(b, **f32)
    pos, neg = torch.zeros((), **f32), torch.zeros((), **f32)
    for c0, c1 in column_chunks(b, big, chunk_size, u.device, _PER_LOGIT):
        dot = mm(uq, cast_operand(v[c0:c1], precision).T, precision)
        own, positive, dropped = _sigmoid_masks(targets, row_labels, offset, b, c0, c1)
        s = (dot * scale).masked_fill(dropped, _NEG_INF)
        diag = _own_logits(diag, s, own)
        at_positive = s.masked_fill(~positive, _NEG_INF)
        row_max = torch.maximum(row_max, s.amax(1))
        row_pos_max = torch.maximum(row_pos_max, at_positive.amax(1))
        stats.col_max[c0:c1] = s.amax(0)
        stats.col_pos_max[c0:c1] = at_positive.amax(0)
        x = torch.addcmul(bias, dot, scale)
        t = torch.logaddexp(torch.where(positive, -x, x), torch.zeros((), **f32))
        t = t.masked_fill(dropped, 0.0)
        pos += t.masked_fill(~positive, 0.0).sum()
        neg += t.masked_fill(positive, 0.0).sum()
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
    for c0, c1 in column_chunks(b, big, chunk_size, u.device, _PER_LOGIT):
        vq = cast_operand(v[c0:c1], precision)
        dot = mm(uq, vq.T, precision)
        _, positive, dropped = _sigmoid_masks(targets, row_labels, offset, b, c0, c1)
        x = torch.addcmul(bias, dot, scale)
        g = torch.where(positive, -torch.sigmoid(-x), torch.sigmoid(x))
        g = (g * row_weight[:, None]).masked_fill(dropped, 0.0)
        dscale += (g * dot).sum()
        dbias += g.sum()
        add_products(du, dv[c0:c1], cast_operand(g, precision), uq, vq, precision)
    return du.mul_(scale), dv.mul_(scale), dscale, dbias
