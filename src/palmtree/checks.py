"""The checks every call of a loss runs first, on its own rank.

Every problem found here is returned as a message, not raised: :func:`palmtree.call.prepare`
hands it to the one exchange all ranks take part in, so that every rank raises the same
:class:`~palmtree.ClipLossInputError` naming the rank(s) at fault instead of one rank
raising while the others wait in a collective.
"""

from __future__ import annotations

import math

import torch

from .backends import BACKENDS
from .distributed import Agreed
from .options import LOSSES, LossOptions, is_real
from .precision import PRECISIONS
from .scale import SCALE_CAPS, log_scale_problem

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def input_problem(image, text, text_mask, logit_scale) -> str | None:
    """Problems in one rank's tensors, as a message (raised later on every rank)."""
    for name, x in (("image_features", image), ("text_features", text)):
        if not isinstance(x, torch.Tensor):
            return f"{name} must be a tensor, got {type(x).__name__}"
        if x.dtype not in DTYPES:
            return f"{name} must be a floating-point tensor (fp32, fp16, bf16, fp64), got {x.dtype}"
        if x.is_meta:
            return f"{name} are on the meta device (shapes without data)"
    if image.dim() != 2:
        return f"image_features must be [b, D], got shape {tuple(image.shape)}"
    if text.dim() not in (2, 3):
        return (
            "text_features must be pooled [b, D] or token latents [b, L, D], got shape "
            f"{tuple(text.shape)}"
        )
    if text.device != image.device:
        return f"image_features are on {image.device} but text_features are on {text.device}"
    if text.dim() == 3 and text_mask is None:
        return (
            "text_features are token latents [b, L, D] but text_mask is None; pass the "
            "padding mask ([b, L], 1 = real token), or torch.ones(b, L) if nothing is padded"
        )
    if text.dim() == 2 and text_mask is not None:
        return "text_mask was given but text_features are already pooled [b, D]"
    if text_mask is not None and not isinstance(text_mask, torch.Tensor):
        return f"text_mask must be a tensor, got {type(text_mask).__name__}"
    if image.shape[0] != text.shape[0]:
        return f"batch sizes differ: {image.shape[0]} images but {text.shape[0]} texts"
    di, dt = image.shape[-1], text.shape[-1]
    if di != dt:
        return (
            f"image feature dim {di} != text feature dim {dt}; project one side first "
            f"(ClipLoss(image_dim={di}, text_dim={dt}, embed_dim=...) does that)"
        )
    if di == 0:
        return "the feature dim is 0: there is nothing to compare"
    return scale_problem(logit_scale, image.device)


def scale_problem(logit_scale, device: torch.device) -> str | None:
    if not isinstance(logit_scale, torch.Tensor):
        if is_real(logit_scale):
            return None
        return f"logit_scale must be a tensor or a number, got {type(logit_scale).__name__}"
    if logit_scale.numel() != 1:
        return f"logit_scale must hold one value, got shape {tuple(logit_scale.shape)}"
    if logit_scale.is_meta:
        return "logit_scale is on the meta device (a shape without data)"
    if not logit_scale.is_floating_point():
        return f"logit_scale must be a floating-point tensor, got {logit_scale.dtype}"
    if logit_scale.device != device:
        return f"logit_scale is on {logit_scale.device} but the features are on {device}"
    return None


def host_checks(image, text, logit_scale, logit_bias, opts: LossOptions, negatives=None):
    """``(problem, (scale, bias))``: non-finite values in the inputs (when
    ``opts.check_finite``), a log-scale the loss cannot use
    (:func:`~palmtree.scale.log_scale_problem`), and the scale's and bias's values (0-dim
    tensors here), read with one host sync."""
    values = [logit_scale.detach().double(), logit_bias.detach().double()]
    features = [("image_features", image), ("text_features", text)]
    if negatives is not None:
        features.append(("text_negatives", negatives))
    if opts.check_finite:
        values += [torch.isfinite(x).all().double() for _, x in features]
    scale, bias, *features_ok = torch.stack(values).tolist()
    problem = log_scale_problem(scale, opts.logit_scale_max, opts.scale_cap)
    if opts.check_finite:
        oks = (*features_ok, math.isfinite(scale), math.isfinite(bias))
        names = (*(name for name, _ in features), "logit_scale", "logit_bias")
        bad = [name for name, ok in zip(names, oks, strict=True) if not ok]
        if bad:
            problem = f"non-finite values (nan or inf) in {', '.join(bad)}"
    return problem, (scale, bias)


def agreed_fields(
    opts: LossOptions,
    loss: str,
    backend: str,
    precision: str,
    image,
    text,
    logit_scale: float,
    logit_bias: float,
) -> list[Agreed]:
    """Everything the ranks must pass identically, for the one exchange (the same fields
    for every loss, so that ranks calling different losses learn so instead of hanging)."""
    dim = image.shape[-1] if isinstance(image, torch.Tensor) and image.dim() == 2 else -1
    cap = opts.logit_scale_max if is_real(opts.logit_scale_max) else math.nan
    return [
        Agreed.choice("loss", loss, LOSSES),
        Agreed("feature dim", dim, str),
        Agreed.choice("image feature dtype", getattr(image, "dtype", None), DTYPES),
        Agreed.choice("text feature dtype", getattr(text, "dtype", None), DTYPES),
        Agreed.choice("backend", backend, BACKENDS),
        Agreed.choice("precision", precision, PRECISIONS),
        Agreed.choice("scale_cap", opts.scale_cap, SCALE_CAPS),
        Agreed.number("logit_scale_max", cap),
        Agreed.number("logit_scale", logit_scale),
        Agreed.number("logit_bias", logit_bias),
        Agreed.choice("normalize", opts.normalize, (False, True)),
    ]
