"""The CLIP loss: ``clip_loss`` (functional) and ``ClipLoss`` (module with the temperature)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from .backends import get_kernels
from .backends.reference import reference_loss
from .call import prepare
from .distributed import Layout
from .options import LossOptions
from .protocol import PassOptions, SinglePassLoss

NORM_EPS = 1e-6


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
    distributed: bool = True,
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
        backend: ``"auto"`` (``chunked``; ``fused`` only on CUDA cards where it has been
            measured, see :data:`palmtree.backends.FUSED_BY_DEFAULT`), ``"reference"``,
            ``"chunked"`` or ``"fused"``. All give the same loss and gradients.
        precision: matmul operand precision ``"ieee" | "tf32" | "bf16"``; ``None``
            follows ``torch.get_float32_matmul_precision()``. Statistics and
            accumulators are fp32 in every mode.
        chunk_size: columns per chunk for ``chunked`` (``None``: from a memory budget).
        logit_scale_max: the temperature cap (100 as in CLIP; ``inf`` for none).
        scale_cap: ``"clamp"`` or ``"straight_through"``; see :func:`capped_scale`.
        normalize: L2-normalise the features (fp32, eps 1e-6). ``False`` takes them
            as given, as open_clip's loss does.
        check_finite: reject NaN/inf features (costs one host sync).
        distributed: ``False`` computes the loss on this process's tensors alone, with no
            collective, even while a process group is up (an evaluation on one rank);
            ``group`` is then ignored.

    Returns:
        :class:`ClipLossOutput`. Ranks may hold different ``b``, including 0; every
        rank must call this (and backpropagate ``loss``) the same number of times
        (a rank that waits for the others in the first exchange says so after two
        minutes, see :mod:`palmtree.watchdog`).

    Raises:
        ClipLossInputError: on every rank, naming the rank(s) whose input or options are
            bad or differ from the others' (docs/design.md lists what is checked).
    """
    opts = LossOptions(
        group=group,
        backend=backend,
        precision=precision,
        chunk_size=chunk_size,
        logit_scale_max=logit_scale_max,
        scale_cap=scale_cap,
        normalize=normalize,
        check_finite=check_finite,
        distributed=distributed,
    )
    return clip_loss_with(opts, image_features, text_features, logit_scale, text_mask)


def clip_loss_with(
    opts: LossOptions,
    image_features,
    text_features,
    logit_scale,
    text_mask=None,
    *,
    local_error: str | None = None,
) -> ClipLossOutput:
    """:func:`clip_loss` with its options as one record, plus a problem the caller (a
    module wrapping the loss) found in this rank's input already."""
    call = prepare(
        "clip", opts, image_features, text_features, logit_scale, text_mask, None, local_error
    )
    with torch.autocast(call.device.type, enabled=False):
        if call.backend == "reference":
            loss, sums = reference_loss(
                call.image,
                call.text,
                call.scale,
                call.layout,
                call.precision,
                opts.normalize,
                NORM_EPS,
            )
        else:
            kernels = get_kernels(call.backend, fallback=opts.backend == "auto")
            how = PassOptions(
                kernels, call.layout, call.precision, opts.chunk_size, opts.normalize, NORM_EPS
            )
            loss, sums = SinglePassLoss.apply(call.image, call.text, call.scale, how)
    return _output(loss, sums, call.scale, call.layout)


def _output(loss, sums, scale, layout: Layout) -> ClipLossOutput:
    B = layout.b_global
    loss_i2t, loss_t2i, acc_i2t, acc_t2i = (sums / B).unbind()
    return ClipLossOutput(
        loss=loss,
        loss_global=(loss_i2t + loss_t2i) / 2,
        loss_i2t=loss_i2t,
        loss_t2i=loss_t2i,
        acc_i2t=acc_i2t,
        acc_t2i=acc_t2i,
        logit_scale=scale.detach(),
        b_local=layout.b_local,
        b_global=B,
    )


class Projections(nn.Module):
    """What both loss modules hold besides their parameters: the checked options, and the
    bias-free linear maps that bring both towers into one embedding width.

    When ``image_dim``, ``text_dim`` and ``embed_dim`` are given, each side whose width
    differs from ``embed_dim`` gets a layer.
    """

    def __init__(
        self,
        image_dim: int | None,
        text_dim: int | None,
        embed_dim: int | None,
        options: LossOptions,
    ):
        super().__init__()
        #: The loss's options (:class:`palmtree.options.LossOptions`), checked here.
        self.options = options.validated()
        if (image_dim is not None or text_dim is not None) and embed_dim is None:
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

    def call_options(self, distributed: bool | None) -> LossOptions:
        """The module's options, with ``distributed`` overridden for one call."""
        if distributed is None or distributed == self.options.distributed:
            return self.options
        return dataclasses.replace(self.options, distributed=distributed)

    def project(self, image_features, text_features):
        """``(image, text, error)``: both sides projected, or a width mismatch as a message.

        Projecting before pooling is fine: a linear map commutes with the masked mean,
        and the loss then sees one width on both sides. The mismatch goes through the
        loss's exchange so that every rank raises it, not just this one.
        """
        for side, x, expected in (
            ("image", image_features, self.image_dim),
            ("text", text_features, self.text_dim),
        ):
            if expected is not None and isinstance(x, torch.Tensor) and x.shape[-1] != expected:
                return (
                    image_features,
                    text_features,
                    (
                        f"{side}_features have dim {x.shape[-1]} but this "
                        f"{type(self).__name__} was built with {side}_dim={expected}"
                    ),
                )
        try:
            if self.image_proj is not None:
                image_features = self.image_proj(image_features)
            if self.text_proj is not None:
                text_features = self.text_proj(text_features)
        except (RuntimeError, TypeError) as exc:  # e.g. a dtype the layer does not take
            return image_features, text_features, f"projecting the features failed: {exc}"
        return image_features, text_features, None

    def describe(self) -> str:
        opts = self.options
        return (
            f"image_dim={self.image_dim}, text_dim={self.text_dim}, embed_dim={self.embed_dim}, "
            f"logit_scale_max={opts.logit_scale_max}, scale_cap={opts.scale_cap!r}, "
            f"backend={opts.backend!r}"
        )


class ClipLoss(Projections):
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
        distributed: bool = True,
    ):
        options = LossOptions(
            group=group,
            distributed=distributed,
            backend=backend,
            precision=precision,
            chunk_size=chunk_size,
            logit_scale_max=logit_scale_max,
            scale_cap=scale_cap,
        )
        super().__init__(image_dim, text_dim, embed_dim, options)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        *,
        distributed: bool | None = None,
    ) -> ClipLossOutput:
        """``distributed=False`` for this call only: see :func:`clip_loss`."""
        image_features, text_features, error = self.project(image_features, text_features)
        return clip_loss_with(
            self.call_options(distributed),
            image_features,
            text_features,
            self.logit_scale,
            text_mask,
            local_error=error,
        )

    def extra_repr(self) -> str:
        return self.describe()
