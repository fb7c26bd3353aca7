"""The CLIP loss: ``clip_loss`` (functional) and ``ClipLoss`` (module with the temperature)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .backends.reference import reference_loss
from .call import NO_EXTRAS, Extras
from .frame import LossKind, LossModule, LossOutput, run
from .options import LossOptions, takes_options
from .protocol import SinglePassLoss

CLIP = LossKind("clip", reference_loss, SinglePassLoss)


@dataclass
class ClipLossOutput(LossOutput):
    """What :func:`clip_loss` returns (see :class:`~palmtree.frame.LossOutput` for the
    fields every loss has): ``loss_global`` is the mean of ``loss_i2t`` and ``loss_t2i``,
    the image->text and text->image cross-entropies over the global batch."""

    loss_i2t: torch.Tensor
    loss_t2i: torch.Tensor

    PARTS: ClassVar[tuple[str, str]] = ("loss_i2t", "loss_t2i")

    @staticmethod
    def total(first, second):
        return (first + second) / 2


@takes_options()
def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    text_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    text_negatives: torch.Tensor | None = None,
    options: LossOptions,
) -> ClipLossOutput:
    """Bidirectional CLIP loss over the global batch of every rank in ``group``.

    Args:
        image_features: ``[b, D]`` this rank's image embeddings (any float dtype).
        text_features: ``[b, D]`` pooled text embeddings, or ``[b, L, D]`` token
            latents pooled here by masked mean over ``text_mask``.
        logit_scale: the *log* temperature, as CLIP models store it (a number or any
            one-element tensor); the loss uses ``min(exp(logit_scale), logit_scale_max)``.
        text_mask: ``[b, L]``, 1 for real tokens; required with token latents.
        labels: ``[b]`` integer item ids (any values): pairs anywhere in the global batch
            with equal ids are the same item, treated as ``same_label`` says. With
            ``"positive"`` image row ``i``'s target is uniform over the texts of its item
            (and text column ``j``'s over the images of its item); with ``"ignore"`` the
            other same-item pairs leave the softmaxes. ``None``: every pair is its own item.
        text_negatives: ``[n, D]`` extra text columns (``n`` may differ per rank, 0
            included): every image row of the global batch also runs its softmax over
            every rank's negatives; they are never a target nor a query (the text->image
            direction is unchanged), and they get gradients. Normalised like the texts.

    Returns:
        :class:`ClipLossOutput`. Ranks may hold different ``b``, including 0; every
        rank must call this (and backpropagate ``loss``) the same number of times
        (a rank that waits for the others in the first exchange says so after two
        minutes, see :mod:`palmtree.watchdog`).

    Raises:
        ClipLossInputError: on every rank, naming the rank(s) whose input or options are
            bad or differ from the others' (docs/design.md lists what is checked).
    """
    extras = Extras(labels, text_negatives)
    return clip_loss_with(
        options, image_features, text_features, logit_scale, text_mask, extras=extras
    )


def clip_loss_with(
    opts: LossOptions,
    image_features,
    text_features,
    logit_scale,
    text_mask=None,
    *,
    local_error: str | None = None,
    extras: Extras = NO_EXTRAS,
) -> ClipLossOutput:
    """:func:`clip_loss` with its options as one record, plus a problem the caller (a
    module wrapping the loss) found in this rank's input already."""
    call, loss, sums = run(
        CLIP,
        opts,
        image_features,
        text_features,
        logit_scale,
        text_mask,
        None,
        local_error,
        extras=extras,
    )
    return ClipLossOutput.of(call, loss, sums)


class ClipLoss(LossModule):
    """CLIP loss with a learnable temperature and optional projections.

    Owns ``logit_scale`` (log space, initialised to ``ln(1/0.07)``). When the image
    and text towers have different widths, pass ``image_dim``, ``text_dim`` and
    ``embed_dim``: a bias-free linear layer maps each side whose width differs from
    ``embed_dim`` into the shared space. Calling the module takes the arguments of
    :func:`clip_loss` (without ``logit_scale``) and returns a :class:`ClipLossOutput`.
    """

    @takes_options()
    def __init__(
        self,
        image_dim: int | None = None,
        text_dim: int | None = None,
        embed_dim: int | None = None,
        *,
        init_logit_scale: float = math.log(1 / 0.07),
        options: LossOptions,
    ):
        super().__init__(image_dim, text_dim, embed_dim, options)
        self.logit_scale = nn.Parameter(torch.tensor([float(init_logit_scale)]))

    def compute(self, opts, image, text, text_mask, error, extras) -> ClipLossOutput:
        return clip_loss_with(
            opts, image, text, self.logit_scale, text_mask, local_error=error, extras=extras
        )
