"""The sigmoid (SigLIP) loss: ``siglip_loss`` (functional) and ``SigLipLoss`` (module).

``L = 1/B * sum_ij softplus(-z_ij * (s <u_i, v_j> + bias))``, ``z`` +1 for the ``B``
matching pairs and -1 for every other pair of the global batch. Same contract as
:func:`palmtree.clip_loss`: rank ``r`` returns ``N * share_r`` (its rows' part of ``L``),
so a data-parallel wrapper's mean leaves the exact global gradient for any split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .backends import get_kernels
from .backends.reference import reference_sigmoid_loss
from .call import prepare
from .loss import NORM_EPS, Projections
from .options import LossOptions
from .protocol import PassOptions, SigmoidPassLoss


@dataclass
class SigLipLossOutput:
    """What :func:`siglip_loss` returns.

    ``loss`` is what this rank backpropagates (``world_size * share_r``); the rest is
    detached and global: ``loss_global`` is ``L``, ``loss_pos`` and ``loss_neg`` its two
    parts (the matching pairs' terms and every other pair's, each divided by ``B``),
    ``acc_i2t``/``acc_t2i`` the fraction of rows/columns whose largest logit is the
    matching pair's.
    """

    loss: torch.Tensor
    loss_global: torch.Tensor
    loss_pos: torch.Tensor
    loss_neg: torch.Tensor
    acc_i2t: torch.Tensor
    acc_t2i: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor
    b_local: int
    b_global: int

    def metrics(self) -> dict[str, float]:
        """Plain floats for logging (one host sync); ``loss`` is the global loss."""
        values = torch.stack(
            [self.loss_global, self.loss_pos, self.loss_neg, self.acc_i2t, self.acc_t2i]
        ).tolist()
        names = ("loss", "loss_pos", "loss_neg", "acc_i2t", "acc_t2i")
        out = dict(zip(names, values, strict=True))
        out.update(
            logit_scale=float(self.logit_scale),
            logit_bias=float(self.logit_bias),
            b_local=self.b_local,
            b_global=self.b_global,
        )
        return out


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    text_mask: torch.Tensor | None = None,
    group=None,
    backend: str = "auto",
    precision: str | None = None,
    chunk_size: int | None = None,
    logit_scale_max: float = math.inf,
    scale_cap: str = "clamp",
    normalize: bool = True,
    check_finite: bool = True,
    distributed: bool = True,
) -> SigLipLossOutput:
    """SigLIP's pairwise sigmoid loss over the global batch of every rank in ``group``.

    Args:
        logit_scale: the *log* temperature (``s = min(exp(logit_scale), logit_scale_max)``).
        logit_bias: the bias ``b`` added to every logit (SigLIP initialises it to -10).
        logit_scale_max: no cap by default (``inf``), as in SigLIP, HF's ``SiglipModel``
            and open_clip's ``SigLipLoss``; a log-scale whose ``exp`` overflows fp32
            (above 88.72) is then refused. Pass 100 for CLIP's cap.
        Everything else as in :func:`palmtree.clip_loss`: features ``[b, D]`` (or token
        latents ``[b, L, D]`` with ``text_mask``), any split over ranks including empty
        ones, every backend, the same checks and the same errors on every rank.

    Returns:
        :class:`SigLipLossOutput`.
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
    return siglip_loss_with(opts, image_features, text_features, logit_scale, logit_bias, text_mask)


def siglip_loss_with(
    opts: LossOptions,
    image_features,
    text_features,
    logit_scale,
    logit_bias,
    text_mask=None,
    *,
    local_error: str | None = None,
) -> SigLipLossOutput:
    """:func:`siglip_loss` with its options as one record (see :func:`clip_loss_with`)."""
    call = prepare(
        "siglip",
        opts,
        image_features,
        text_features,
        logit_scale,
        text_mask,
        logit_bias,
        local_error,
    )
    with torch.autocast(call.device.type, enabled=False):
        if call.backend == "reference":
            loss, sums = reference_sigmoid_loss(
                call.image,
                call.text,
                call.scale,
                call.bias,
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
            loss, sums = SigmoidPassLoss.apply(call.image, call.text, call.scale, call.bias, how)
    B = call.layout.b_global
    loss_pos, loss_neg, acc_i2t, acc_t2i = (sums / B).unbind()
    return SigLipLossOutput(
        loss=loss,
        loss_global=loss_pos + loss_neg,
        loss_pos=loss_pos,
        loss_neg=loss_neg,
        acc_i2t=acc_i2t,
        acc_t2i=acc_t2i,
        logit_scale=call.scale.detach(),
        logit_bias=call.bias.detach().clone(),  # a copy: the parameter itself may be fp32
        b_local=call.layout.b_local,
        b_global=B,
    )


class SigLipLoss(Projections):
    """SigLIP loss with a learnable temperature and bias, and optional projections.

    Owns ``logit_scale`` (log space, initialised to ``ln 10``, not capped unless
    ``logit_scale_max`` is given) and ``logit_bias`` (initialised to -10), as SigLIP does,
    and the projections of :class:`ClipLoss` when
    the towers' widths differ. Calling the module takes the arguments of
    :func:`siglip_loss` (without the two parameters) and returns a
    :class:`SigLipLossOutput`.
    """

    def __init__(
        self,
        image_dim: int | None = None,
        text_dim: int | None = None,
        embed_dim: int | None = None,
        *,
        init_logit_scale: float = math.log(10.0),
        init_logit_bias: float = -10.0,
        logit_scale_max: float = math.inf,
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
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        *,
        distributed: bool | None = None,
    ) -> SigLipLossOutput:
        """``distributed=False`` for this call only: see :func:`palmtree.clip_loss`."""
        image_features, text_features, error = self.project(image_features, text_features)
        return siglip_loss_with(
            self.call_options(distributed),
            image_features,
            text_features,
            self.logit_scale,
            self.logit_bias,
            text_mask,
            local_error=error,
        )

    def extra_repr(self) -> str:
        return self.describe()
