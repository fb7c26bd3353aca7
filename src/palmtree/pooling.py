"""Masked mean pooling of token latents."""

from __future__ import annotations

import torch

from .tracing import MASK_EMPTY_ROW, MASK_NOT_BINARY, compiling, require


def masked_mean_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens of each sequence.

    Args:
        x: ``[b, L, D]`` token latents, any float dtype.
        mask: ``[b, L]``, 1 / ``True`` for real tokens, 0 for padding; what padded
            positions hold (even NaN or inf) does not matter.

    Returns:
        ``[b, D]`` in ``x``'s dtype. The sum is taken in fp32 (fp64 for fp64 input), so
        long bf16/fp16 sequences do not lose precision.

    Raises:
        ValueError: on a shape mismatch, a mask value other than 0 and 1, or a row with
            no real token (its mean would be 0/0; almost always a data-pipeline bug).
    """
    return _masked_mean(x, mask)


def masked_mean_pool_fp32(x: torch.Tensor, mask: torch.Tensor, findings=None) -> torch.Tensor:
    """:func:`masked_mean_pool` that keeps the fp32 result (what the loss consumes). Under
    ``torch.compile`` with a ``findings`` dict, the mask's value checks are added to it
    (for every rank to see, :func:`palmtree.distributed.exchange_layout`), not asserted."""
    return _masked_mean(x.float(), mask, findings)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, findings=None) -> torch.Tensor:
    _check_shapes(x, mask)
    real = mask.bool()
    counts = real.sum(dim=1, keepdim=True)
    empty = counts.squeeze(1) == 0
    if not compiling():
        _check_mask_values(mask, empty)
    elif findings is not None:
        findings.update(mask_findings(mask, empty))
    else:  # no host sync in a graph: the same checks as assertions
        for message, bad in mask_findings(mask, empty).items():
            require(~bad, message)
    # Padded positions are zeroed, not multiplied by 0 (0 * nan is nan), and each real
    # token is weighted 1/count before the sum, which then never exceeds max|x|.
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    weights = real.to(wide) / counts
    tokens = x.to(wide).masked_fill(~real[:, :, None], 0.0)
    return torch.einsum("bl,bld->bd", weights, tokens).to(x.dtype)


def _check_shapes(x: torch.Tensor, mask: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"masked_mean_pool expects x of shape [b, L, D], got {tuple(x.shape)}")
    if mask.shape != x.shape[:2]:
        raise ValueError(
            f"text_mask shape {tuple(mask.shape)} does not match token latents "
            f"{tuple(x.shape)}: expected [{x.shape[0]}, {x.shape[1]}]"
        )
    if mask.device != x.device:
        raise ValueError(f"text_mask is on {mask.device} but the token latents are on {x.device}")


def mask_findings(mask: torch.Tensor, empty: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mask's value checks as ``{message: bad}``, ``bad`` a 0-dim bool tensor (``empty``:
    the rows with no real token): what a compiled graph checks (:mod:`palmtree.tracing`)."""
    return {MASK_NOT_BINARY: ~_binary(mask), MASK_EMPTY_ROW: empty.any()}


def _check_mask_values(mask: torch.Tensor, empty: torch.Tensor) -> None:
    if mask.dtype != torch.bool and not bool(_binary(mask)):  # a bool mask: no sync
        raise ValueError(f"text_mask must hold only 0 and 1 (or be bool), got dtype {mask.dtype}")
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
        raise ValueError(f"text_mask has no real token in row(s) {shown}")


def _binary(mask: torch.Tensor) -> torch.Tensor:
    """0-dim bool: every value of ``mask`` is 0 or 1 (always, for a bool mask)."""
    if mask.dtype == torch.bool:
        return torch.ones((), dtype=torch.bool, device=mask.device)
    return ((mask == 0) | (mask == 1)).all()
