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
    _check_shapes(x, mask)
    if compiling():  # no host sync in a graph: the same checks as assertions
        for message, bad in mask_findings(mask).items():
            require(~bad, message)
    else:
        _check_mask_values(mask)
    return _pool(x, mask)


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


def mask_findings(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mask's value checks as ``{message: bad}``, ``bad`` a 0-dim bool tensor: what a
    compiled graph checks (:mod:`palmtree.tracing`)."""
    binary = mask.dtype == torch.bool or ((mask == 0) | (mask == 1)).all()
    return {
        MASK_NOT_BINARY: ~torch.as_tensor(binary, device=mask.device),
        MASK_EMPTY_ROW: (mask.bool().sum(dim=1) == 0).any(),
    }


def _check_mask_values(mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"text_mask must hold only 0 and 1 (or be bool), got dtype {mask.dtype}")
    empty = mask.bool().sum(dim=1) == 0
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
        raise ValueError(f"text_mask has no real token in row(s) {shown}")


def _pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    real = mask.bool()
    counts = real.sum(dim=1, keepdim=True)
    # Padded positions are zeroed, not multiplied by 0 (0 * nan is nan), and each real
    # token is weighted 1/count before the sum, which then never exceeds max|x|.
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    weights = real.to(wide) / counts
    tokens = x.to(wide).masked_fill(~real[:, :, None], 0.0)
    return torch.einsum("bl,bld->bd", weights, tokens).to(x.dtype)


def masked_mean_pool_fp32(x: torch.Tensor, mask: torch.Tensor, findings=None) -> torch.Tensor:
    """:func:`masked_mean_pool` that keeps the fp32 result (what the loss consumes). Under
    ``torch.compile`` with a ``findings`` dict, the mask's value checks are added to it
    (for every rank to see, :func:`palmtree.distributed.exchange_layout`), not asserted."""
    if compiling() and findings is not None:
        _check_shapes(x, mask)
        findings.update(mask_findings(mask))
        return _pool(x.float(), mask)
    return masked_mean_pool(x.float(), mask)
