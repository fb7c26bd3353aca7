"""Masked mean pooling of token latents."""

from __future__ import annotations

import torch


def masked_mean_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens of each sequence.

    Args:
        x: ``[b, L, D]`` token latents, any float dtype.
        mask: ``[b, L]``, nonzero / ``True`` for real tokens, zero for padding.

    Returns:
        ``[b, D]`` in ``x``'s dtype. The sum and the count are taken in fp32, so
        long bf16/fp16 sequences do not lose precision.

    Raises:
        ValueError: on a shape mismatch, or when a row has no real token (its mean
            would be 0/0; such a row is almost always a data-pipeline bug).
    """
    if x.dim() != 3:
        raise ValueError(f"masked_mean_pool expects x of shape [b, L, D], got {tuple(x.shape)}")
    if mask.shape != x.shape[:2]:
        raise ValueError(
            f"text_mask shape {tuple(mask.shape)} does not match token latents "
            f"{tuple(x.shape)}: expected [{x.shape[0]}, {x.shape[1]}]"
        )
    if mask.device != x.device:
        raise ValueError(f"text_mask is on {mask.device} but the token latents are on {x.device}")
    if mask.dtype.is_floating_point and not torch.isin(mask, mask.new_tensor([0.0, 1.0])).all():
        raise ValueError("a floating-point text_mask must hold only 0 and 1")
    weights = (mask != 0).to(torch.float32)
    counts = weights.sum(dim=1, keepdim=True)
    empty = counts.squeeze(1) == 0
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
        raise ValueError(f"text_mask has no real token in row(s) {shown}")
    return (torch.einsum("bl,bld->bd", weights, x.float()) / counts).to(x.dtype)


def masked_mean_pool_fp32(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`masked_mean_pool` that keeps the fp32 result (what the loss consumes)."""
    return masked_mean_pool(x.float(), mask)
