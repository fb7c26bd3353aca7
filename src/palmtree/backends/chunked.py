"""Pure-PyTorch single-pass backend: column chunks of the logits, never the whole block.

Each chunk ``S[:, c0:c1] = s * U V[c0:c1]^T`` is used for both directions at once:
the rows' online log-sum-exp and the columns' partial log-sum-exp come from the same
product, and the backward recomputes the chunk once for ``dU``, ``dV`` and ``ds``.
Peak extra memory is a few ``b x chunk`` fp32 buffers.
"""

from __future__ import annotations

import torch

from ..precision import cast_operand, mm
from .base import ForwardStats

#: Bytes of ``b x chunk`` fp32 temporaries the backward keeps alive at once, roughly.
_BYTES_PER_LOGIT = 4 * 5
_DEFAULT_BUDGET = {"cpu": 64 << 20, "cuda": 1 << 30}


def auto_chunk_size(b: int, big: int, device: torch.device, budget: int | None = None) -> int:
    """Columns per chunk so that the chunk temporaries stay within ``budget`` bytes."""
    if budget is None:
        budget = _DEFAULT_BUDGET.get(device.type, 256 << 20)
    cols = budget // (_BYTES_PER_LOGIT * max(b, 1))
    cols = max(128, (cols // 128) * 128)
    return max(1, min(cols, big))


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
        f32 = dict(dtype=torch.float32, device=u.device)
        col_max = torch.full((big,), -torch.inf, **f32)
        col_sum = torch.zeros(big, **f32)
        if b == 0:
            empty = torch.empty(0, **f32)
            return ForwardStats(empty, empty, col_max, col_sum, empty)
        chunk = chunk_size or auto_chunk_size(b, big, u.device)
        uq = cast_operand(u, precision)
        row_max = torch.full((b,), -torch.inf, **f32)
        row_sum = torch.zeros(b, **f32)
        diag = torch.empty(b, **f32)
        for c0 in range(0, big, chunk):
            c1 = min(c0 + chunk, big)
            s = mm(uq, cast_operand(v[c0:c1], precision).T, precision).mul_(scale)
            # Columns: complete over the local rows within this one chunk.
            cmax = s.amax(0)
            col_max[c0:c1] = cmax
            col_sum[c0:c1] = torch.exp(s - cmax).sum(0)
            # Rows: online rescaling across chunks.
            new_max = torch.maximum(row_max, s.amax(1))
            row_sum = row_sum * torch.exp(row_max - new_max) + torch.exp(s - new_max[:, None]).sum(
                1
            )
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
        du = torch.zeros_like(u, dtype=torch.float32)
        dv = torch.zeros_like(v, dtype=torch.float32)
        dscale = torch.zeros((), dtype=torch.float32, device=u.device)
        if b == 0:
            return du, dv, dscale
        chunk = chunk_size or auto_chunk_size(b, big, u.device)
        uq = cast_operand(u, precision)
        for c0 in range(0, big, chunk):
            c1 = min(c0 + chunk, big)
            vq = cast_operand(v[c0:c1], precision)
            s = mm(uq, vq.T, precision).mul_(scale)
            g = torch.exp(s - row_shift[:, None]).mul_(row_coef[:, None])
            g += torch.exp(s - col_shift[None, c0:c1]).mul_(col_coef[None, c0:c1])
            where = _diag_slice(offset, b, c0, c1, u.device)
            if where is not None:
                g[where[0], where[1]] -= pos_weight[where[0]]
            dscale += (g * s).sum()
            gq = cast_operand(g, precision)
            du += mm(gq, vq, precision)
            dv[c0:c1] = mm(gq.T, uq, precision)
        return du.mul_(scale), dv.mul_(scale), dscale / scale
