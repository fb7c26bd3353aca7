"""Seeded (image, text) feature pairs: the inputs every check in palmtree starts from."""

from __future__ import annotations

import torch

KINDS = ("correlated", "adversarial", "aligned")


def make_pairs(
    B: int,
    dim: int,
    seed: int = 0,
    *,
    kind: str = "correlated",
    noise: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``B`` seeded (image, text) feature pairs, the same on every machine and rank.

    ``"correlated"``: texts are their images plus noise (0.7 by default), images have a
    realistic spread of norms (unnormalised). ``"aligned"``: noise 0.05, so at a large
    scale every softmax is peaked on its positive and the loss is small.
    ``"adversarial"``: every similarity near -1 (at scale 100 every logit sits near
    -100, where a fixed max-shift underflows) and the first two pairs duplicated.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    if kind == "adversarial":
        e = torch.randn(dim, **f64)
        img = e + 0.05 * torch.randn(B, dim, **f64)
        txt = -e + 0.05 * torch.randn(B, dim, **f64)
        if B >= 2:
            img[1], txt[1] = img[0], txt[0]
        return img.to(dtype), txt.to(dtype)
    noise = (0.7 if kind == "correlated" else 0.05) if noise is None else noise
    base = torch.randn(B, dim, **f64)
    img = base * (1 + torch.rand(B, 1, **f64))
    txt = base + noise * torch.randn(B, dim, **f64)
    return img.to(dtype), txt.to(dtype)
