"""The two towers and the module that joins them with the loss (CLIP or SigLIP).

Both towers accept an empty batch (``b = 0``), which a rank gets when the last global
batch does not reach it. Neither uses batch statistics (no BatchNorm), so a rank's
features do not depend on how the global batch was split, nor on its cut into
micro-batches (``--accum-steps``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ClipLoss, SigLipLoss


@dataclass
class ModelConfig:
    in_channels: int = 1
    image_width: int = 32  # channels of the first conv block
    image_dim: int = 128  # image tower output
    vocab_size: int = 64
    context_length: int = 32
    text_width: int = 64  # token latent dim: differs from image_dim on purpose
    text_layers: int = 2
    text_heads: int = 4
    embed_dim: int = 64  # shared space, reached through the loss's projections
    loss: str = "clip"  # "clip" (ClipLoss) or "siglip" (SigLipLoss)
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float = -10.0  # siglip only
    logit_scale_max: float = 100.0
    backend: str = "auto"
    #: ``--same-label`` (``None``: the loss gets no labels; a resume must keep it).
    same_label: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class ImageEncoder(nn.Module):
    """A small CNN: two conv stages, global average pooling, a linear head."""

    def __init__(self, in_channels: int, width: int, out_dim: int) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.GELU()]

        self.features = nn.Sequential(
            *block(in_channels, w),
            *block(w, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * w, out_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[b, C, H, W]`` -> ``[b, out_dim]``."""
        return self.head(self.features(images))


class Block(nn.Module):
    """Pre-norm self-attention + MLP; padding keys are masked out."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, width = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        # scaled_dot_product_attention, unlike nn.MultiheadAttention, accepts b = 0.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.out(y.transpose(1, 2).reshape(b, length, width))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """A small pre-norm Transformer over word tokens; returns token latents ``[b, L, width]``.

    Pooling is left to the loss (``masked_mean_pool`` with the text mask).
    """

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int):
        super().__init__()
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.randn(context_length, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``ids, mask [b, L]`` -> token latents ``[b, L, width]``."""
        length = ids.shape[1]
        if length > self.position.shape[0]:
            raise ValueError(f"{length} tokens exceed the context length {self.position.shape[0]}")
        x = self.token(ids) + self.position[:length]
        mask = mask.bool()
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)


def build_loss(config: ModelConfig) -> nn.Module:
    """:class:`palmtree.ClipLoss` or :class:`palmtree.SigLipLoss` (with its bias)."""
    common = dict(
        image_dim=config.image_dim,
        text_dim=config.text_width,
        embed_dim=config.embed_dim,
        init_logit_scale=config.init_logit_scale,
        logit_scale_max=config.logit_scale_max,
        backend=config.backend,
        same_label=config.same_label or "positive",  # without labels it does nothing
    )
    if config.loss == "siglip":
        return SigLipLoss(**common, init_logit_bias=config.init_logit_bias)
    if config.loss == "clip":
        return ClipLoss(**common)
    raise ValueError(f"unknown loss {config.loss!r}")


class Autocast(nn.Module):
    """Runs ``module`` under autocast to ``dtype`` on ``device_type`` (``None``: as is).

    For :func:`palmtree.accumulate`, which calls the towers and the loss itself: the
    autocast then covers their forwards only, never the backward it runs after them.
    """

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, *args, **kwargs):
        if self.dtype is None:
            return self.module(*args, **kwargs)
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(*args, **kwargs)


class Towers(nn.Module):
    """The image and the text tower as one module (``encode`` of :func:`palmtree.accumulate`).

    ``(images, ids, mask)`` -> ``(image features [b, image_dim], token latents [b, L,
    text_width], mask)``, what the loss takes.
    """

    def __init__(self, image: nn.Module, text: nn.Module) -> None:
        super().__init__()
        self.image, self.text = image, text

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
        return self.image(images), self.text(ids, mask), mask


class DualEncoder(nn.Module):
    """Image tower + text tower + the loss (which owns the scale, the projections and,
    for SigLIP, the bias)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.image = ImageEncoder(config.in_channels, config.image_width, config.image_dim)
        self.text = TextEncoder(
            config.vocab_size,
            config.context_length,
            config.text_width,
            config.text_layers,
            config.text_heads,
        )
        self.loss_fn = build_loss(config)

    def towers(self) -> Towers:
        """Both towers as one module; it shares their parameters (and is not saved twice)."""
        return Towers(self.image, self.text)

    def clamp_logit_scale(self) -> None:
        """Keeps the log-temperature in ``[0, ln logit_scale_max]``, where the cap lets it
        move: above it the loss uses the cap and gives it no gradient to come back."""
        with torch.no_grad():
            self.loss_fn.logit_scale.clamp_(0, math.log(self.config.logit_scale_max))

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, labels=None):
        """The loss's output record (``ClipLossOutput`` or ``SigLipLossOutput``); a
        collective over all ranks. ``labels`` (``[b]`` ids, ``--same-label``) go to the loss."""
        extra = {} if labels is None else {"labels": labels}
        return self.loss_fn(self.image(images), self.text(ids, mask), text_mask=mask, **extra)
