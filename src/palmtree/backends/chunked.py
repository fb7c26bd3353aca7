"""Pure-PyTorch single-pass backend: column chunks of the logits, never the whole block.

Each chunk ``S[:, c0:c1] = s * U V[c0:c1]^T`` is used for both directions at once:
the rows' online log-sum-exp and the columns' partial log-sum-exp come from the same
product, and the backward recomputes the chunk once for ``dU``, ``dV`` and ``ds``.
Peak extra memory is a few ``b x chunk`` fp32 buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..precision import cast_operand, fp32_matmul_mode, mm
from .base import ForwardStats, GradientTerms, SigmoidStats, zero_grads
from .chunked_targets import (
    backward_with_targets,
    forward_with_targets,
    sigmoid_backward_with_targets,
    sigmoid_forward_with_targets,
)
from .chunks import (
    add_products,
    column_chunks,
    diag_slice,
    reuse_buffer,
    split_chunks,
    without_positives,
)


class ChunkedKernels:
    name = "chunked"

    def forward(
        self, u, v, scale, offset, precision, chunk_size, targets=None, pairs=None
    ) -> ForwardStats:
        b, big = u.shape[0], v.shape[0]
        stats = ForwardStats.empty(big, u.device)  # column partials are filled in below
        if targets is not None:
            return forward_with_targets(u, v, scale, offset, precision, chunk_size, targets)
        if b == 0:
            return stats
        col_max, col_neg = stats.col_max, stats.col_neg
        f32 = dict(dtype=torch.float32, device=u.device)
        uq = cast_operand(u, precision)
        row_max = torch.full((b,), -torch.inf, **f32)
        row_neg = torch.zeros(b, **f32)
        diag = torch.empty(b, **f32)
        scratch = None
        for c0, c1 in split_chunks(b, big, chunk_size, u.device, pairs):
            s = mm(uq, cast_operand(v[c0:c1], precision).T, precision).mul_(scale)
            scratch = reuse_buffer(scratch, s)
            where = diag_slice(offset, b, c0, c1, u.device)
            if where is not None:
                diag[where[0]] = s[where[0], where[1]]
            if pairs is None or c0 < pairs:  # no softmax runs down an extra negative's column
                # Columns: complete over the local rows within this one chunk.
                cmax = s.amax(0)
                col_max[c0:c1] = cmax
                e = without_positives(torch.sub(s, cmax, out=scratch).exp_(), where)
                col_neg[c0:c1] = e.sum(0)
            # Rows: online rescaling across chunks.
            new_max = torch.maximum(row_max, s.amax(1))
            e = without_positives(torch.sub(s, new_max[:, None], out=scratch).exp_(), where)
            row_neg = row_neg * torch.exp(row_max - new_max) + e.sum(1)
            row_max = new_max
        return ForwardStats(row_max, row_neg, col_max, col_neg, diag)

    def backward(
        self, u, v, scale, offset, precision, chunk_size, terms: GradientTerms, pairs=None
    ):
        b, big = u.shape[0], v.shape[0]
        if terms.targets is not None:
            return backward_with_targets(u, v, scale, offset, precision, chunk_size, terms)
        du, dv, dscale = zero_grads(u, v)
        if b == 0:
            return du, dv, dscale
        uq = cast_operand(u, precision)
        row_shift, row_coef = terms.row_shift[:, None], terms.row_coef[:, None]
        row_dot = terms.pair_dot[offset : offset + b, None]
        g = scratch = tmp = None
        for c0, c1 in split_chunks(b, big, chunk_size, u.device, pairs):
            vq = cast_operand(v[c0:c1], precision)
            # The same call and shapes as the forward, so S rounds as it did there.
            dot = mm(uq, vq.T, precision)
            g, scratch, tmp = (
                reuse_buffer(g, dot),
                reuse_buffer(scratch, dot),
                reuse_buffer(tmp, dot),
            )
            s = torch.mul(dot, scale, out=g)
            where = diag_slice(offset, b, c0, c1, u.device)
            if where is not None:
                s[where[0], where[1]] = terms.diag[where[0]]
            columns = pairs is None or c0 < pairs  # the extra negatives' have no softmax
            if columns:
                p_col = torch.sub(s, terms.col_shift[None, c0:c1], out=scratch).exp_()
                p_col.mul_(terms.col_coef[None, c0:c1])
            p_row = s.sub_(row_shift).exp_().mul_(row_coef)
            # Each similarity against its row's and its column's positive (base.py): at a
            # peaked softmax the terms share a sign, where sum(G * dot) would cancel.
            row_terms = torch.sub(dot, row_dot, out=tmp).mul_(p_row)
            dscale += without_positives(row_terms, where).sum()
            if columns:
                col_terms = dot.sub_(terms.pair_dot[None, c0:c1]).mul_(p_col)
                dscale += without_positives(col_terms, where).sum()
                del col_terms
            del dot  # in tf32/bf16 modes the rounded gradient takes this memory
            g = p_row.add_(p_col) if columns else p_row
            if where is not None:
                g[where[0], where[1]] = terms.pos_grad[where[0]]
            add_products(du, dv[c0:c1], cast_operand(g, precision), uq, vq, precision)
        return du.mul_(scale), dv.mul_(scale), dscale

    def sigmoid_forward(
        self, u, v, scale, bias, offset, precision, chunk_size, targets=None
    ) -> SigmoidStats:
        if targets is not None:
            return sigmoid_forward_with_targets(
                u, v, scale, bias, offset, precision, chunk_size, targets
            )
        b, big = u.shape[0], v.shape[0]
        stats = SigmoidStats.empty(big, u.device)
        if b == 0:
            return stats
        f32 = dict(dtype=torch.float32, device=u.device)
        uq = cast_operand(u, precision)
        col_max = stats.col_max
        row_max = torch.full((b,), -torch.inf, **f32)
        diag = torch.empty(b, **f32)
        neg, zero = torch.zeros((), **f32), torch.zeros((), **f32)
        for c0, c1 in column_chunks(b, big, chunk_size, u.device):
            dot = mm(uq, cast_operand(v[c0:c1], precision).T, precision)
            # The maxima and positives of S = scale * dot are taken from dot and scaled
            # after the loop: scale >= 0 and rounding is monotonic, so
            # fl(scale * max(dot)) == max(fl(scale * dot)), bit for bit.
            torch.amax(dot, 0, out=col_max[c0:c1])
            torch.maximum(row_max, dot.amax(1), out=row_max)
            where = diag_slice(offset, b, c0, c1, u.device)
            if where is not None:
                diag[where[0]] = dot[where[0], where[1]]
            x = torch.addcmul(bias, dot, scale, out=dot)  # S + bias: dot is not needed again
            if where is not None:
                x[where[0], where[1]] = -torch.inf  # the positives' terms are summed below
            # softplus(x) = logaddexp(x, 0), in place: no second b x chunk buffer.
            neg += torch.logaddexp(x, zero, out=x).sum()
        diag.mul_(scale)  # S at the positives, from the chunks' own products
        pos = F.softplus(-(diag + bias)).sum()  # a positive's term: softplus(-(S + bias))
        return SigmoidStats(pos, neg, row_max.mul_(scale), col_max.mul_(scale), diag)

    def sigmoid_backward(
        self, u, v, scale, bias, offset, precision, chunk_size, row_weight, targets=None
    ):
        if targets is not None:
            return sigmoid_backward_with_targets(
                u, v, scale, bias, offset, precision, chunk_size, row_weight, targets
            )
        b, big = u.shape[0], v.shape[0]
        du, dv, dscale = zero_grads(u, v)
        dbias = dscale.clone()
        if b == 0:
            return du, dv, dscale, dbias
        f32 = dict(dtype=torch.float32, device=u.device)
        uq = cast_operand(u, precision)
        weight = row_weight[:, None]
        diag = torch.empty(b, **f32)  # U V^T at the positives
        # fp32 operands: every chunk's product goes into one buffer (no allocation per chunk).
        fp32 = uq.dtype == torch.float32
        chunks = column_chunks(b, big, chunk_size, u.device)
        widest = chunks[0][1] - chunks[0][0]  # the first chunk is a widest one
        dots = torch.empty(b * widest, **f32) if fp32 else None
        g = None
        for c0, c1 in chunks:
            vq = cast_operand(v[c0:c1], precision)
            if fp32:
                dot = dots[: b * (c1 - c0)].view(b, c1 - c0)
                with fp32_matmul_mode(precision, u.device):
                    torch.mm(uq, vq.T, out=dot)
            else:
                dot = mm(uq, vq.T, precision)
            g = reuse_buffer(g, dot)
            x = torch.addcmul(bias, dot, scale, out=g)  # S + bias
            where = diag_slice(offset, b, c0, c1, u.device)
            if where is not None:
                # A positive's G = -sigmoid(-x) is added after the loop, from its product
                # saved here: sigmoid(x) - 1 would cancel where sigmoid(x) ~ 1.
                diag[where[0]] = dot[where[0], where[1]]
                x[where[0], where[1]] = -torch.inf  # sigmoid(-inf) = 0
            g = x.sigmoid_().mul_(weight)  # G on the negatives: w_i sigmoid(x)
            dscale += torch.mul(g, dot, out=dot).sum()  # dot is not needed again
            dbias += g.sum()
            add_products(du, dv[c0:c1], cast_operand(g, precision), uq, vq, precision)
        # The positives (row i, column offset + i): G = -w_i sigmoid(-x), x = S + bias.
        g_pos = torch.sigmoid(-torch.addcmul(bias, diag, scale)).mul_(row_weight).neg_()
        rows = slice(offset, offset + b)
        du.addcmul_(g_pos[:, None], v[rows])
        dv[rows].addcmul_(g_pos[:, None], u)
        dscale += torch.dot(g_pos, diag)
        dbias += g_pos.sum()
        return du.mul_(scale), dv.mul_(scale), dscale, dbias
