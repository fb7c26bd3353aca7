"""The CLIP loss: ``clip_loss`` (functional) and ``ClipLoss`` (module with the temperature)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .backends import get_kernels, resolve_backend
from .backends.reference import reference_loss
from .distributed import ClipLossInputError, Layout, exchange_layout
from .pooling import masked_mean_pool_fp32
from .precision import resolve_precision
from .protocol import PassOptions, SinglePassLoss

NORM_EPS = 1e-6
SCALE_CAPS = ("clamp", "straight_through")


@dataclass
class ClipLossOutput:
    """What :func:`clip_loss` returns.

    ``loss`` is what this rank backpropagates: ``world_size * share_r``, where the
    per-rank shares add up to the global loss. Data-parallel wrappers average
    gradients over ranks, so after that average every parameter holds exactly the
    gradient of the single-process loss on the whole global batch, even when ranks
    hold different numbers of pairs. Everything else is detached and global
    (identical on every rank).
    """

    loss: torch.Tensor
    loss_global: torch.Tensor
    loss_i2t: torch.Tensor
    loss_t2i: torch.Tensor
    acc_i2t: torch.Tensor
    acc_t2i: torch.Tensor
    logit_scale: torch.Tensor
    b_local: int
    b_global: int

    def metrics(self) -> dict[str, float]:
        """Plain floats for logging (one host sync)."""
        values = torch.stack(
            [self.loss_global, self.loss_i2t, self.loss_t2i, self.acc_i2t, self.acc_t2i]
        ).tolist()
        names = ("loss", "loss_i2t", "loss_t2i", "acc_i2t", "acc_t2i")
        out = dict(zip(names, values, strict=True))
        out.update(
            logit_scale=float(self.logit_scale), b_local=self.b_local, b_global=self.b_global
        )
        return out


def capped_scale(logit_scale: torch.Tensor, cap: float, mode: str = "clamp") -> torch.Tensor:
    """``min(exp(logit_scale), cap)`` in fp32.

    ``"clamp"``: above the cap the temperature gets no gradient (the original CLIP
    behaviour; pair it with clamping the parameter after each step, as open_clip does).
    ``"straight_through"``: the value is capped but the gradient is that of ``exp``, so
    the optimiser can still pull a parameter that drifted above the cap back down.
    Neither mode turns a huge ``logit_scale`` (``exp`` overflows fp32 above ~88.7) into
    a NaN value or gradient.
    """
    if mode not in SCALE_CAPS:
        raise ValueError(f"scale_cap must be one of {SCALE_CAPS}, got {mode!r}")
    x = logit_scale.float()
    if mode == "straight_through":
        return _StraightThroughCap.apply(x, cap)
    # exp() of an argument held just above log(cap): the value still reaches the cap and
    # the clamp's zero gradient never meets an infinite exp' (0 * inf is NaN).
    return x.clamp(max=min(math.log(cap) + 1.0, 88.0)).exp().clamp(max=cap)


class _StraightThroughCap(torch.autograd.Function):
    """``min(exp(x), cap)`` whose gradient is ``exp(x)``'s, uncapped."""

    @staticmethod
    def forward(ctx, x, cap):
        ctx.save_for_backward(x)
        return x.clamp(max=min(math.log(cap) + 1.0, 88.0)).exp().clamp(max=cap)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        # exp(x) in float64: finite far beyond fp32's range; a zero upstream stays 0.
        slope = torch.where(grad == 0, 0.0, grad.double() * x.double().exp())
        return slope.to(grad.dtype), None


def _check_local(image_features, text_features, text_mask, logit_scale) -> str | None:
    """Problems in this rank's inputs, as a message (raised later on every rank)."""
    for name, x in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(x, torch.Tensor):
            return f"{name} must be a tensor, got {type(x).__name__}"
        if not x.is_floating_point():
            return f"{name} must be a floating-point tensor, got {x.dtype}"
    if image_features.dim() != 2:
        return f"image_features must be [b, D], got shape {tuple(image_features.shape)}"
    if text_features.dim() not in (2, 3):
        return (
            "text_features must be pooled [b, D] or token latents [b, L, D], got shape "
            f"{tuple(text_features.shape)}"
        )
    if text_features.device != image_features.device:
        return (
            f"image_features are on {image_features.device} but text_features are on "
            f"{text_features.device}"
        )
    if text_features.dim() == 3 and text_mask is None:
        return (
            "text_features are token latents [b, L, D] but text_mask is None; pass the "
            "padding mask ([b, L], 1 = real token), or torch.ones(b, L) if nothing is padded"
        )
    if text_features.dim() == 2 and text_mask is not None:
        return "text_mask was given but text_features are already pooled [b, D]"
    if image_features.shape[0] != text_features.shape[0]:
        return (
            f"batch sizes differ: {image_features.shape[0]} images but "
            f"{text_features.shape[0]} texts"
        )
    di, dt = image_features.shape[-1], text_features.shape[-1]
    if di != dt:
        return (
            f"image feature dim {di} != text feature dim {dt}; project one side first "
            f"(ClipLoss(image_dim={di}, text_dim={dt}, embed_dim=...) does that)"
        )
    if logit_scale.numel() != 1:
        return f"logit_scale must hold one value, got shape {tuple(logit_scale.shape)}"
    return None


def _finite_error(image_features, text_features, logit_scale) -> str | None:
    checks = torch.stack(
        [
            torch.isfinite(image_features).all(),
            torch.isfinite(text_features).all(),
            torch.isfinite(logit_scale).all(),
        ]
    ).tolist()
    names = ("image_features", "text_features", "logit_scale")
    bad = [n for n, ok in zip(names, checks, strict=True) if not ok]
    return f"non-finite values (nan or inf) in {', '.join(bad)}" if bad else None


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    text_mask: torch.Tensor | None = None,
    group=None,
    backend: str = "auto",
    precision: str | None = None,
    chunk_size: int | None = None,
    logit_scale_max: float = 100.0,
    scale_cap: str = "clamp",
    normalize: bool = True,
    check_finite: bool = True,
) -> ClipLossOutput:
    """Bidirectional CLIP loss over the global batch of every rank in ``group``.

    Args:
        image_features: ``[b, D]`` this rank's image embeddings (any float dtype).
        text_features: ``[b, D]`` pooled text embeddings, or ``[b, L, D]`` token
            latents pooled here by masked mean over ``text_mask``.
        logit_scale: the *log* temperature, as CLIP models store it; the loss uses
            ``min(exp(logit_scale), logit_scale_max)``.
        text_mask: ``[b, L]``, 1 for real tokens; required with token latents.
        group: process group whose ranks share negatives (default: the default group;
            no process group at all means one rank).
        backend: ``"auto"`` (fused on CUDA with Triton, else chunked), ``"reference"``,
            ``"chunked"`` or ``"fused"``. All give the same loss and gradients.
        precision: matmul operand precision ``"ieee" | "tf32" | "bf16"``; ``None``
            follows ``torch.get_float32_matmul_precision()``. Statistics and
            accumulators are fp32 in every mode.
        chunk_size: columns per chunk for ``chunked`` (``None``: from a memory budget).
        logit_scale_max: the temperature cap (100 as in CLIP).
        scale_cap: ``"clamp"`` or ``"straight_through"``; see :func:`capped_scale`.
        normalize: L2-normalise the features (fp32, eps 1e-6). ``False`` takes them
            as given, as open_clip's loss does.
        check_finite: reject NaN/inf features (costs one host sync).

    Returns:
        :class:`ClipLossOutput`. Ranks may hold different ``b``, including 0; every
        rank must call this (and backpropagate ``loss``) the same number of times.

    Raises:
        ClipLossInputError: on every rank, naming the rank(s) whose input is bad.
    """
    return _clip_loss(
        image_features,
        text_features,
        logit_scale,
        text_mask=text_mask,
        group=group,
        backend=backend,
        precision=precision,
        chunk_size=chunk_size,
        logit_scale_max=logit_scale_max,
        scale_cap=scale_cap,
        normalize=normalize,
        check_finite=check_finite,
    )


def _clip_loss(
    image_features,
    text_features,
    logit_scale,
    *,
    text_mask,
    group,
    backend,
    precision,
    chunk_size,
    logit_scale_max,
    scale_cap,
    normalize,
    check_finite,
    local_error: str | None = None,
) -> ClipLossOutput:
    """:func:`clip_loss` plus a problem the caller found in this rank's input already."""
    valid = isinstance(image_features, torch.Tensor) and image_features.dim() == 2
    device = image_features.device if valid else torch.device("cpu")
    if not isinstance(logit_scale, torch.Tensor):
        logit_scale = torch.tensor(float(logit_scale), device=device)
    if scale_cap not in SCALE_CAPS:
        raise ValueError(f"scale_cap must be one of {SCALE_CAPS}, got {scale_cap!r}")
    name = resolve_backend(backend, device)
    mode = resolve_precision(precision)

    # Everything numeric below is fp32 whatever autocast says (pooling included).
    with torch.autocast(device.type, enabled=False):
        local_error = local_error or _check_local(
            image_features, text_features, text_mask, logit_scale
        )
        if local_error is None and text_features.dim() == 3:
            try:
                text_features = masked_mean_pool_fp32(text_features, text_mask)
            except ValueError as exc:
                local_error = str(exc)
        if local_error is None and check_finite:
            local_error = _finite_error(image_features, text_features, logit_scale)

        layout = exchange_layout(
            image_features.shape[0] if valid else 0,
            image_features.shape[-1] if valid else -1,
            image_features.dtype if valid else torch.float32,
            device,
            local_error,
            group,
        )
        if layout.b_global == 0:
            raise ClipLossInputError("the global batch is empty: every rank passed 0 pairs")

        scale = capped_scale(logit_scale, logit_scale_max, scale_cap)
        if name == "reference":
            loss, sums = reference_loss(
                image_features, text_features, scale, layout, mode, normalize, NORM_EPS
            )
        else:
            opts = PassOptions(get_kernels(name), layout, mode, chunk_size, normalize, NORM_EPS)
            loss, sums = SinglePassLoss.apply(image_features, text_features, scale, opts)
    return _output(loss, sums, scale, layout)


def _output(loss, sums, scale, layout: Layout) -> ClipLossOutput:
    big = layout.b_global
    loss_i2t, loss_t2i, acc_i2t, acc_t2i = (sums / big).unbind()
    return ClipLossOutput(
        loss=loss,
        loss_global=(loss_i2t + loss_t2i) / 2,
        loss_i2t=loss_i2t,
        loss_t2i=loss_t2i,
        acc_i2t=acc_i2t,
        acc_t2i=acc_t2i,
        logit_scale=scale.detach(),
        b_local=layout.b_local,
        b_global=big,
    )


class ClipLoss(nn.Module):
    """CLIP loss with a learnable temperature and optional projections.

    Owns ``logit_scale`` (log space, initialised to ``ln(1/0.07)``). When the image
    and text towers have different widths, pass ``image_dim``, ``text_dim`` and
    ``embed_dim``: a bias-free linear layer maps each side whose width differs from
    ``embed_dim`` into the shared space. Calling the module takes the arguments of
    :func:`clip_loss` (without ``logit_scale``) and returns a :class:`ClipLossOutput`.
    """

    def __init__(
        self,
        image_dim: int | None = None,
        text_dim: int | None = None,
        embed_dim: int | None = None,
        *,
        init_logit_scale: float = math.log(1 / 0.07),
        logit_scale_max: float = 100.0,
        scale_cap: str = "clamp",
        backend: str = "auto",
        precision: str | None = None,
        chunk_size: int | None = None,
        group=None,
    ):
        super().__init__()
        if scale_cap not in SCALE_CAPS:
            raise ValueError(f"scale_cap must be one of {SCALE_CAPS}, got {scale_cap!r}")
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_scale_max = logit_scale_max
        self.scale_cap = scale_cap
        self.backend = backend
        self.precision = precision
        self.chunk_size = chunk_size
        self.group = group
        dims = (image_dim, text_dim)
        if any(d is not None for d in dims) and embed_dim is None:
            if image_dim is None or text_dim is None or image_dim != text_dim:
                raise ValueError(
                    f"image_dim={image_dim} and text_dim={text_dim} differ: pass embed_dim "
                    "to project both into one space"
                )
            embed_dim = image_dim
        self.image_dim, self.text_dim, self.embed_dim = image_dim, text_dim, embed_dim
        self.image_proj = self._projection(image_dim, embed_dim)
        self.text_proj = self._projection(text_dim, embed_dim)

    @staticmethod
    def _projection(dim, embed_dim):
        if dim is None or dim == embed_dim:
            return None
        layer = nn.Linear(dim, embed_dim, bias=False)
        nn.init.normal_(layer.weight, std=dim**-0.5)
        return layer

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        text_mask: torch.Tensor | None = None,
    ) -> ClipLossOutput:
        # Project before pooling: a linear map commutes with the masked mean, and the
        # loss then sees one feature width on both sides. A width mismatch is reported
        # through the loss so that every rank raises it, not just this one.
        error = None
        for side, x, expected in (
            ("image", image_features, self.image_dim),
            ("text", text_features, self.text_dim),
        ):
            if expected is not None and isinstance(x, torch.Tensor) and x.shape[-1] != expected:
                error = error or (
                    f"{side}_features have dim {x.shape[-1]} but this ClipLoss was built "
                    f"with {side}_dim={expected}"
                )
        if error is None:
            if self.image_proj is not None:
                image_features = self.image_proj(image_features)
            if self.text_proj is not None:
                text_features = self.text_proj(text_features)
        return _clip_loss(
            image_features,
            text_features,
            self.logit_scale,
            text_mask=text_mask,
            group=self.group,
            backend=self.backend,
            precision=self.precision,
            chunk_size=self.chunk_size,
            logit_scale_max=self.logit_scale_max,
            scale_cap=self.scale_cap,
            normalize=True,
            check_finite=True,
            local_error=error,
        )

    def extra_repr(self) -> str:
        return (
            f"image_dim={self.image_dim}, text_dim={self.text_dim}, embed_dim={self.embed_dim}, "
            f"logit_scale_max={self.logit_scale_max}, scale_cap={self.scale_cap!r}, "
            f"backend={self.backend!r}"
        )
