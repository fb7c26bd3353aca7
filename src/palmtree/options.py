"""The loss's options as one frozen record, and the checks every call runs first.

Every problem found here is returned as a message, not raised: :func:`palmtree.clip_loss`
hands it to the one exchange all ranks take part in, so that every rank raises the same
:class:`~palmtree.ClipLossInputError` naming the rank(s) at fault instead of one rank
raising while the others wait in a collective.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .backends import BACKENDS, backend_name_problem
from .distributed import LOCAL, Agreed
from .precision import PRECISIONS, precision_problem
from .scale import SCALE_CAPS, log_scale_problem, scale_cap_problem

#: The losses, everywhere (``palmtree train --loss``, ``bench --loss``, ``verify --losses``).
LOSSES = ("clip", "siglip")

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class LossOptions:
    """How the loss is computed; see :func:`palmtree.clip_loss` for each field."""

    group: object = None
    backend: str = "auto"
    precision: str | None = None
    chunk_size: int | None = None
    logit_scale_max: float = 100.0
    scale_cap: str = "clamp"
    normalize: bool = True
    check_finite: bool = True
    distributed: bool = True

    @property
    def exchange_group(self):
        """The group the loss exchanges with: ``group``, or :data:`~palmtree.distributed.LOCAL`
        (this process alone, no collective) when ``distributed`` is ``False``."""
        return self.group if self.distributed else LOCAL

    def problem(self) -> str | None:
        """What is wrong with the option values themselves (``None`` if nothing)."""
        problem = (
            backend_name_problem(self.backend)
            or precision_problem(self.precision)
            or scale_cap_problem(self.scale_cap)
        )
        if problem is not None:
            return problem
        cap = self.logit_scale_max
        if not _is_real(cap) or not cap > 0:  # also rejects nan
            return f"logit_scale_max must be a number > 0 (inf for no cap), got {cap!r}"
        size = self.chunk_size
        if size is not None and (not _is_int(size) or size < 1):
            return f"chunk_size must be None or an integer >= 1, got {size!r}"
        for name in ("normalize", "check_finite", "distributed"):
            if not isinstance(getattr(self, name), bool):
                return f"{name} must be True or False, got {getattr(self, name)!r}"
        return None

    def validated(self) -> LossOptions:
        """``self``, or a ``ValueError`` (for constructors, which run on every rank alike)."""
        problem = self.problem()
        if problem is not None:
            raise ValueError(problem)
        return self


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


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
        if _is_real(logit_scale):
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


def host_checks(image, text, logit_scale, logit_bias, opts: LossOptions):
    """``(problem, (scale, bias))``: non-finite values in the inputs (when
    ``opts.check_finite``), a log-scale the loss cannot use
    (:func:`~palmtree.scale.log_scale_problem`), and the scale's and bias's values (0-dim
    tensors here), read with one host sync."""
    values = [logit_scale.detach().double(), logit_bias.detach().double()]
    if opts.check_finite:
        values += [torch.isfinite(image).all().double(), torch.isfinite(text).all().double()]
    scale, bias, *features_ok = torch.stack(values).tolist()
    problem = log_scale_problem(scale, opts.logit_scale_max, opts.scale_cap)
    if opts.check_finite:
        oks = (*features_ok, math.isfinite(scale), math.isfinite(bias))
        names = ("image_features", "text_features", "logit_scale", "logit_bias")
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
    cap = opts.logit_scale_max if _is_real(opts.logit_scale_max) else math.nan
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
