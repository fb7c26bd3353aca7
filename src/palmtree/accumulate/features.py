"""The cached features of the first pass: their form, every rank's shapes, one batch of them,
and each micro-batch's slice of their gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..distributed import ClipLossInputError
from .ranks import Failure, Ranks


@dataclass
class Layout:
    """What every rank's features look like: the dims and dtypes of the two sides, the
    device, whether texts are token latents (with a mask) and their longest length here."""

    image_dim: int
    text_dim: int
    image_dtype: torch.dtype
    text_dtype: torch.dtype
    tokens: bool
    length: int
    device: torch.device


def features_of(out) -> tuple:
    """``encode``'s output as a tuple of 2 or 3 tensors (mask as the third), or TypeError."""
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
        raise TypeError(
            "encode must return (image_features, text_features) or (image_features, "
            f"text_features, text_mask), got {type(out).__name__}"
        )
    if not all(isinstance(x, torch.Tensor) for x in out[:2]):
        raise TypeError("encode must return tensors as image_features and text_features")
    return tuple(out)


def exchange_shapes(cached, failure: Failure | None, ranks: Ranks) -> Layout:
    """Every rank learns the features' shapes (a rank without micro-batches needs them to
    pass empty ones) and every rank's first-pass failures, in one small exchange; a failure
    anywhere raises the same :class:`ClipLossInputError` on every rank."""
    mine = None
    if cached and failure is None:
        img, txt = cached[0][:2]
        mine = (img.shape[-1], txt.shape[-1], img.dtype, txt.dtype, txt.dim() == 3, img.device)
        if any(
            (c[0].shape[-1], c[1].shape[-1], c[1].dim() == 3) != (mine[0], mine[1], mine[4])
            for c in cached
        ):
            failure = Failure("micro-batches give features of different widths or forms")
        elif mine[4] and any(len(c) < 3 or c[2] is None for c in cached):
            failure = Failure("encode returned token latents [b, L, D] without a text_mask")
    entries = ranks.gather((mine, failure and failure.message))
    if any(e is not None for _, e in entries):
        cause = failure and failure.cause
        raise ClipLossInputError(ranks.describe([e for _, e in entries])) from cause
    shapes = [m for m, _ in entries if m is not None]
    if not shapes:
        raise ClipLossInputError("the global batch is empty: no rank has a micro-batch")
    dims = mine or shapes[0]
    length = max((c[1].shape[1] for c in cached), default=1) if dims[4] else 0
    device = mine[5] if mine else _default_device(dims[5])
    return Layout(dims[0], dims[1], dims[2], dims[3], dims[4], length, device)


def _default_device(other: torch.device) -> torch.device:
    """A device like another rank's, on this rank (its own CUDA device)."""
    if other.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return other


def concatenate(cached, layout: Layout) -> list[torch.Tensor]:
    """This rank's micro-batches as one batch; token latents padded to the longest (mask 0)."""
    kw = dict(device=layout.device)
    if not cached:
        img = torch.empty(0, layout.image_dim, dtype=layout.image_dtype, **kw)
        if not layout.tokens:
            return [img, torch.empty(0, layout.text_dim, dtype=layout.text_dtype, **kw)]
        txt = torch.empty(0, 1, layout.text_dim, dtype=layout.text_dtype, **kw)
        return [img, txt, torch.empty(0, 1, dtype=torch.long, **kw)]
    img = torch.cat([c[0] for c in cached])
    if not layout.tokens:
        return [img, torch.cat([c[1] for c in cached])]
    pad = layout.length
    txt = torch.cat([nn.functional.pad(c[1], (0, 0, 0, pad - c[1].shape[1])) for c in cached])
    mask = torch.cat([nn.functional.pad(_mask(c), (0, pad - c[1].shape[1])) for c in cached])
    return [img, txt, mask]


def _mask(c) -> torch.Tensor:
    return c[2].long() if c[2].dtype == torch.bool else c[2]


def slices(feature_grads, cached, k: int, layout: Layout) -> tuple:
    """Micro-batch ``k``'s rows of the cached gradients (its own token length)."""
    start = sum(c[0].shape[0] for c in cached[:k])
    stop = start + cached[k][0].shape[0]
    img, txt = (g[start:stop] for g in feature_grads)
    if layout.tokens:
        txt = txt[:, : cached[k][1].shape[1]]
    return img, txt
