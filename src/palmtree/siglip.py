"""The sigmoid (SigLIP) loss: ``siglip_loss`` (functional) and ``SigLipLoss`` (module).

``L = 1/B * sum_ij softplus(-z_ij * (s <u_i, v_j> + bias))``, ``z`` +1 for the ``B``
matching pairs and -1 for every other pair of the global batch. Same contract as
:func:`palmtree.clip_loss`: rank ``r`` returns ``N * share_r`` (its rows' part of ``L``),
so a data-parallel wrapper's mean leaves the exact global gradient for any split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .backends.reference import reference_sigmoid_loss
from .call import NO_EXTRAS, Extras
from .frame import LossKind, LossModule, LossOutput, run
from .options import LossOptions, takes_options
from .protocol import SigmoidPassLoss

SIGLIP = LossKind("siglip", reference_sigmoid_loss, SigmoidPassLoss)

#: SigLIP, HF's ``SiglipModel`` and open_clip's ``SigLipLoss`` do not cap the scale.
NO_CAP = dict(logit_scale_max=math.inf)


@dataclass
class SigLipLossOutput(LossOutput):
    """What :func:`siglip_loss` returns (see :class:`~palmtree.frame.LossOutput` for the
    fields every loss has): ``loss_global`` is ``L``, the sum of ``loss_pos`` and
    ``loss_neg`` (the matching pairs' terms and every other pair's, each divided by
    ``B``); ``logit_bias`` is the bias the loss used."""

    loss_pos: torch.Tensor
    loss_neg: torch.Tensor
    logit_bias: torch.Tensor

    PARTS: ClassVar[tuple[str, str]] = ("loss_pos", "loss_neg")

    @staticmethod
    def total(first, second):
        return first + second


@takes_options(**NO_CAP)
def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    text_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    text_negatives: torch.Tensor | None = None,
    options: LossOptions,
) -> SigLipLossOutput:
    """SigLIP's pairwise sigmoid loss over the global batch of every rank in ``group``.

    Args:
        image_features, text_features, text_mask: as in :func:`palmtree.clip_loss`:
            ``[b, D]`` (or token latents ``[b, L, D]`` with ``text_mask``), any split over
            ranks including empty ones.
        logit_scale: the *log* temperature (``s = min(exp(logit_scale), logit_scale_max)``;
            no cap by default, as in SigLIP, HF's ``SiglipModel`` and open_clip's
            ``SigLipLoss``; pass ``logit_scale_max=100`` for CLIP's).
        logit_bias: the bias ``b`` added to every logit (SigLIP initialises it to -10);
            a number or any one-element tensor, as the scale.
        labels: ``[b]`` integer item ids, as in :func:`palmtree.clip_loss`: with
            ``same_label="positive"`` every pair of one item has ``z = +1``; with
            ``"ignore"`` the same-item pairs off the diagonal leave the sum.
        text_negatives: ``[n, D]`` extra text columns: every (image, negative) pair of
            the global batch is one more term with ``z = -1``. The normalisation stays
            ``1 / B``.

    Returns:
        :class:`SigLipLossOutput`; the same checks and the same errors on every rank as
        :func:`palmtree.clip_loss`.
    """
    extras = Extras(labels, text_negatives)
    return siglip_loss_with(
        options, image_features, text_features, logit_scale, logit_bias, text_mask, extras=extras
    )


def siglip_loss_with(
    opts: LossOptions,
    image_features,
    text_features,
    logit_scale,
    logit_bias,
    text_mask=None,
    *,
    local_error: str | None = None,
    extras: Extras = NO_EXTRAS,
) -> SigLipLossOutput:
    """:func:`siglip_loss` with its options as one record (see :func:`clip_loss_with`)."""
    call, loss, sums = run(
        SIGLIP,
        opts,
        image_features,
        text_features,
        logit_scale,
        text_mask,
        logit_bias,
        local_error,
        extras=extras,
    )
    # A copy of the bias: the parameter itself may be the fp32 tensor the loss used.
    return SigLipLossOutput.of(call, loss, sums, logit_bias=call.bias.detach().clone())


class SigLipLoss(LossModule):
    """SigLIP loss with a learnable temperature and bias, and optional projections.

    Owns ``logit_scale`` (log space, initialised to ``ln 10``, not capped unless
    ``logit_scale_max`` is given) and ``logit_bias`` (initialised to -10), as SigLIP does,
    and the projections of :class:`~palmtree.ClipLoss` when the towers' widths differ.
    Calling the module takes the arguments of :func:`siglip_loss` (without the two
    parameters) and returns a :class:`SigLipLossOutput`.
    """

    @takes_options(**NO_CAP)
    def __init__(
        self,
        image_dim: int | None = None,
        text_dim: int | None = None,
        embed_dim: int | None = None,
        *,
        init_logit_scale: float = math.log(10.0),
        init_logit_bias: float = -10.0,
        options: LossOptions,
    ):
        super().__init__(image_dim, text_dim, embed_dim, options)
        self.logit_scale = nn.Parameter(torch.tensor([float(init_logit_scale)]))
        self.logit_bias = nn.Parameter(torch.tensor([float(init_logit_bias)]))

    def compute(self, opts, image, text, text_mask, error, extras) -> SigLipLossOutput:
        scale, bias = self.logit_scale, self.logit_bias
        return siglip_loss_with(
            opts, image, text, scale, bias, text_mask, local_error=error, extras=extras
        )
