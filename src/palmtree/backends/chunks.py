"""The column chunks the ``chunked`` backend walks, and what its passes share."""

from __future__ import annotations

import torch

from ..precision import fp32_matmul_mode, mm

#: Bytes of ``b x chunk`` temporaries alive at once: the backward's four fp32 buffers
#: (product, gradient, scratch, the temperature's terms); in tf32/bf16 modes the rounded
#: copy of the gradient takes the freed product's place.
_BYTES_PER_LOGIT = 4 * 4
_DEFAULT_BUDGET = {"cpu": 32 << 20, "cuda": 1 << 30}


def auto_chunk_size(
    b: int, big: int, device: torch.device, budget: int | None = None, per_logit: int = 0
) -> int:
    """Columns per chunk so that the chunk temporaries (``per_logit`` bytes of them per
    logit; default the plain passes') stay within ``budget`` bytes."""
    if budget is None:
        budget = _DEFAULT_BUDGET.get(device.type, 256 << 20)
    cols = budget // ((per_logit or _BYTES_PER_LOGIT) * max(b, 1))
    cols = max(128, (cols // 128) * 128)
    return max(1, min(cols, big))


#: ``chunk_size`` for the whole block as one chunk: what the protocol asks for under
#: ``torch.compile`` with several ranks, where ``B`` is a value the graph reads at run
#: time and the number of chunks cannot be known while tracing (docs/design.md §9).
WHOLE = 0


def column_chunks(b: int, big, chunk_size: int | None, device, per_logit: int = 0) -> list:
    """The ``[c0, c1)`` column ranges of ``big`` columns: chunks of ``chunk_size`` (``None``:
    :func:`auto_chunk_size` for ``per_logit`` bytes a logit), or one for :data:`WHOLE`."""
    if chunk_size == WHOLE:
        return [(0, big)]
    chunk = chunk_size or auto_chunk_size(b, big, device, per_logit=per_logit)
    return [(c0, min(c0 + chunk, big)) for c0 in range(0, big, chunk)]


def split_chunks(b: int, big, chunk_size, device, pairs: int | None) -> list:
    """:func:`column_chunks` of the first ``pairs`` columns, then of the rest (``None``:
    of all ``big`` as one range), so that no chunk holds both a pair's column and an
    extra negative's: the passes skip the columns' statistics of the latter."""
    if pairs is None:
        return column_chunks(b, big, chunk_size, device)
    rest = column_chunks(b, big - pairs, chunk_size, device) if big > pairs else []
    return column_chunks(b, pairs, chunk_size, device) + [
        (pairs + c0, pairs + c1) for c0, c1 in rest
    ]


def reuse_buffer(buf: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A scratch tensor shaped like ``like``, reused across chunks (the last one is smaller)."""
    if buf is None or buf.numel() < like.numel():
        return torch.empty_like(like)
    return buf.view(-1)[: like.numel()].view(like.shape)


def diag_slice(offset: int, b: int, c0: int, c1: int, device):
    """Local rows whose positive column lies in ``[c0, c1)``, and those columns' positions."""
    lo, hi = max(offset, c0), min(offset + b, c1)
    if lo >= hi:
        return None
    rows = torch.arange(lo - offset, hi - offset, device=device)
    return rows, rows + (offset - c0)


def add_products(du, dv_chunk, gq, uq, vq, precision: str) -> None:
    """``du += gq @ vq`` and ``dv_chunk = gq^T @ uq``, in place for fp32 operands (no
    ``b x D`` temporary per chunk)."""
    if gq.dtype == torch.float32:
        with fp32_matmul_mode(precision, uq.device):
            du.addmm_(gq, vq)
            torch.mm(gq.T, uq, out=dv_chunk)
    else:
        du += mm(gq, vq, precision)
        dv_chunk.copy_(mm(gq.T, uq, precision))


def without_positives(e: torch.Tensor, where) -> torch.Tensor:
    """``e`` with the positives of the chunk (``where``, from :func:`diag_slice`) zeroed."""
    if where is not None:
        e[where[0], where[1]] = 0.0
    return e
