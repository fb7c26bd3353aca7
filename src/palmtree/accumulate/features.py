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
    device, whether texts are token latents (with a mask) and their longest length here,
    and whether micro-batches give extra negatives."""

    image_dim: int
    text_dim: int
    image_dtype: torch.dtype
    text_dtype: torch.dtype
    tokens: bool
    length: int
    device: torch.device
    negatives: bool = False


def features_of(out) -> tuple:
    """``encode``'s output as a tuple of 2, 3 (the mask third) or 4 tensors (the mask, or
    ``None``, third; the extra negatives fourth), or TypeError."""
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 3, 4):
        raise TypeError(
            "encode must return (image_features, text_features), (image_features, "
            "text_features, text_mask) or (image_features, text_features, text_mask or "
            f"None, text_negatives), got {type(out).__name__}"
        )
    if not all(isinstance(x, torch.Tensor) for x in out[:2]):
        raise TypeError("encode must return tensors as image_features and text_features")
    if len(out) == 4 and not isinstance(out[3], torch.Tensor):
        raise TypeError("encode must return a tensor [n, D] as text_negatives (the fourth)")
    return tuple(out)


def negatives_of(cached, layout: Layout) -> torch.Tensor | None:
    """This rank's extra negatives of every micro-batch, in order (``None``: none given;
    ``[0, D]`` on a rank without micro-batches where the others give them)."""
    if not layout.negatives:
        return None
    if not cached:
        return torch.empty(0, layout.text_dim, dtype=layout.text_dtype, device=layout.device)
    return torch.cat([c[3] for c in cached])


def exchange_shapes(cached, failure: Failure | None, ranks: Ranks) -> Layout:
    """Every rank learns the features' shapes (a rank without micro-batches needs them to
    pass empty ones) and every rank's first-pass failures, in one small exchange; a failure
    anywhere raises the same :class:`ClipLossInputError` on every rank."""
    mine = None
    if cached and failure is None:
        img, txt = cached[0][:2]
        mine = (img.shape[-1], txt.shape[-1], img.dtype, txt.dtype, txt.dim() == 3, img.device)
        mine += (len(cached[0]) == 4,)
        if any(
            (c[0].shape[-1], c[1].shape[-1], c[1].dim() == 3) != (mine[0], mine[1], mine[4])
            for c in cached
        ):
            failure = Failure("micro-batches give features of different widths or forms")
        elif mine[4] and any(len(c) < 3 or c[2] is None for c in cached):
            failure = Failure("encode returned token latents [b, L, D] without a text_mask")
        elif len({len(c) == 4 for c in cached}) > 1:
            failure = Failure("some micro-batches gave text_negatives and others did not")
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
    return Layout(dims[0], dims[1], dims[2], dims[3], dims[4], length, device, dims[6])


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
    """Micro-batch ``k``'s rows of the cached gradients (its own token length), and of the
    negatives' gradient when it gave negatives."""
    start = sum(c[0].shape[0] for c in cached[:k])
    stop = start + cached[k][0].shape[0]
    img, txt = (g[start:stop] for g in feature_grads[:2])
    if layout.tokens:
        txt = txt[:, : cached[k][1].shape[1]]
    if len(cached[k]) < 4:
        return img, txt
    first = sum(c[3].shape[0] for c in cached[:k])
    return img, txt, feature_grads[2][first : first + cached[k][3].shape[0]]
