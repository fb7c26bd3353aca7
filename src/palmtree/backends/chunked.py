"""Pure-PyTorch single-pass backend: column chunks of the logits, never the whole block.

Each chunk ``S[:, c0:c1] = s * U V[c0:c1]^T`` is used for both directions at once:
the rows' online log-sum-exp and the columns' partial log-sum-exp come from the same
product, and the backward recomputes the chunk once for ``dU``, ``dV`` and ``ds``.
Peak extra memory is a few ``b x chunk`` fp32 buffers.
"""

from __future__ import annotations

import torch

from ..precision import cast_operand, fp32_matmul_mode, mm
from .base import ForwardStats, zero_grads

#: Bytes of ``b x chunk`` temporaries alive at once: the backward's three fp32 buffers
#: (logits, gradient, scratch) and a rounded copy of the gradient in tf32/bf16 modes.
_BYTES_PER_LOGIT = 4 * 4
_DEFAULT_BUDGET = {"cpu": 32 << 20, "cuda": 1 << 30}


def auto_chunk_size(b: int, big: int, device: torch.device, budget: int | None = None) -> int:
    """Columns per chunk so that the chunk temporaries stay within ``budget`` bytes."""
    if budget is None:
        budget = _DEFAULT_BUDGET.get(device.type, 256 << 20)
    cols = budget // (_BYTES_PER_LOGIT * max(b, 1))
    cols = max(128, (cols // 128) * 128)
    return max(1, min(cols, big))


def _buffer(buf: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A scratch tensor shaped like ``like``, reused across chunks (the last one is smaller)."""
    if buf is None or buf.numel() < like.numel():
        return torch.empty_like(like)
    return buf.view(-1)[: like.numel()].view(like.shape)


def _diag_slice(offset: int, b: int, c0: int, c1: int, device):
    """Local rows whose positive column lies in ``[c0, c1)``, and those columns' positions."""
    lo, hi = max(offset, c0), min(offset + b, c1)
    if lo >= hi:
        return None
    rows = torch.arange(lo - offset, hi - offset, device=device)
    return rows, rows + (offset - c0)


class ChunkedKernels:
    name = "chunked"

    def forward(self, u, v, scale, offset, precision, chunk_size) -> ForwardStats:
        b, big = u.shape[0], v.shape[0]
        stats = ForwardStats.empty(big, u.device)  # column partials are filled in below
        if b == 0:
            return stats
        col_max, col_sum = stats.col_max, stats.col_sum
        f32 = dict(dtype=torch.float32, device=u.device)
        chunk = chunk_size or auto_chunk_size(b, big, u.device)
        uq = cast_operand(u, precision)
        row_max = torch.full((b,), -torch.inf, **f32)
        row_sum = torch.zeros(b, **f32)
        diag = torch.empty(b, **f32)
        scratch = None
        for c0 in range(0, big, chunk):
            c1 = min(c0 + chunk, big)
            s = mm(uq, cast_operand(v[c0:c1], precision).T, precision).mul_(scale)
            scratch = _buffer(scratch, s)
            # Columns: complete over the local rows within this one chunk.
            cmax = s.amax(0)
            col_max[c0:c1] = cmax
            col_sum[c0:c1] = torch.sub(s, cmax, out=scratch).exp_().sum(0)
            # Rows: online rescaling across chunks.
            new_max = torch.maximum(row_max, s.amax(1))
            rescale = torch.exp(row_max - new_max)
            row_sum = row_sum * rescale + torch.sub(s, new_max[:, None], out=scratch).exp_().sum(1)
            row_max = new_max
            where = _diag_slice(offset, b, c0, c1, u.device)
            if where is not None:
                diag[where[0]] = s[where[0], where[1]]
        return ForwardStats(row_max, row_sum, col_max, col_sum, diag)

    def backward(
        self,
        u,
        v,
        scale,
        offset,
        precision,
        chunk_size,
        row_shift,
        row_coef,
        col_shift,
        col_coef,
        pos_weight,
    ):
        b, big = u.shape[0], v.shape[0]
        du, dv, dscale = zero_grads(u, v)
        if b == 0:
            return du, dv, dscale
        chunk = chunk_size or auto_chunk_size(b, big, u.device)
        uq = cast_operand(u, precision)
        g = scratch = None
        for c0 in range(0, big, chunk):
            c1 = min(c0 + chunk, big)
            vq = cast_operand(v[c0:c1], precision)
            s = mm(uq, vq.T, precision).mul_(scale)
            g, scratch = _buffer(g, s), _buffer(scratch, s)
            torch.sub(s, row_shift[:, None], out=g).exp_().mul_(row_coef[:, None])
            torch.sub(s, col_shift[None, c0:c1], out=scratch).exp_()
            g.addcmul_(scratch, col_coef[None, c0:c1])
            where = _diag_slice(offset, b, c0, c1, u.device)
            if where is not None:
                g[where[0], where[1]] -= pos_weight[where[0]]
            dscale += torch.mul(g, s, out=scratch).sum()
            gq = cast_operand(g, precision)
            if gq.dtype == torch.float32:  # accumulate in place: no b x D temporary per chunk
                with fp32_matmul_mode(precision, u.device):
                    du.addmm_(gq, vq)
                    torch.mm(gq.T, uq, out=dv[c0:c1])
            else:
                du += mm(gq, vq, precision)
                dv[c0:c1] = mm(gq.T, uq, precision)
        return du.mul_(scale), dv.mul_(scale), dscale / scale
