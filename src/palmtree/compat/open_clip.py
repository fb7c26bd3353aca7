"""Drop-ins for open_clip's ``ClipLoss`` and ``SigLipLoss``: always the exact global loss.

Replace ``from open_clip.loss import ClipLoss`` (or ``open_clip.ClipLoss``) with
``from palmtree.compat.open_clip import ClipLoss``, and likewise ``SigLipLoss``;
nothing else changes (``SigLipLoss`` is described at the class). The
constructor takes open_clip's arguments, ``forward(image_features, text_features,
logit_scale, logit_bias=None, output_dict=False)`` has open_clip's meaning (unit
features as the model gives them, ``logit_scale`` already exponentiated, no cap) and
returns what open_clip returns. This module does not import open_clip.

**Why ``local_loss`` and ``gather_with_grad`` no longer change the result.** With ``N``
ranks of ``b`` pairs each (``B = N * b``) and the global loss ``L = (L_i2t + L_t2i) / 2``
of one process on the whole batch, open_clip's rank ``r`` returns ``l_r``, and DDP
gives every parameter the mean over ranks of what each rank's backward sends it
through that rank's own features (plus the shared temperature):

* ``local_loss=True, gather_with_grad=True``: ``l_r`` is the mean over the local rows
  (``N * share_r``, the shares summing to ``L``); the gather's backward sums over
  ranks, so rank ``r``'s features get ``sum_k dl_k/dx_r = N dL/dx_r`` and the mean is
  ``dL/dtheta``. **Exact**: this is what this class computes, in one pass.
* ``local_loss=False, gather_with_grad=True``: every rank computes ``l_r = L`` on the
  whole gathered ``B x B`` matrix; the gather's backward sums the ``N`` copies, so the
  mean is again ``dL/dtheta``. Exact too, but each rank does the whole batch's work and
  holds ``B x B`` logits (``N`` times the compute, O(B^2) memory).
* ``local_loss=False, gather_with_grad=False``: each rank computes ``L`` with only its
  own features differentiable, so they get ``dL/dx_r`` once instead of ``N`` times:
  after DDP's mean the image and text towers receive ``dL/dtheta / N`` while
  ``logit_scale`` receives its exact gradient. **Wrong**: the towers' gradient shrinks
  with the world size, and so does their step relative to the temperature's.
* ``local_loss=True, gather_with_grad=False``: gathered features are constants and a
  rank's own features appear only in its own rows, so images receive only the
  gradient of the image->text term and texts only that of the text->image term:
  ``(dL_i2t/du, dL_t2i/dv) / 2`` instead of ``dL/du = (dL_i2t/du + dL_t2i/du) / 2`` (and
  likewise for ``v``). **Wrong**: half of the gradient is dropped, and not in
  proportion, so the direction changes; only ``logit_scale``'s gradient is exact.

All four also need the same batch size on every rank (equal-shape gathers, labels
``arange(b) + b * rank``). This class ignores both flags: each rank computes its own
rows of the global logits once, the gradient that other ranks' rows send to its
features comes back through one reduce-scatter, and ranks may hold different numbers
of pairs (zero included). The first forward on more than one rank warns once per
process when the flags are one of open_clip's wrong combinations, because training
then differs from (is corrected against) a run of open_clip with the same flags.

**The value returned** is rank ``r``'s ``N * share_r``: on equal splits exactly open_clip's
``local_loss=True`` value (the mean over the local rows), whose mean over ranks is
``L``. open_clip's ``local_loss=False`` returns ``L`` itself on every rank; here ``L`` is
in ``self.last_output.loss_global`` (with accuracies, see :class:`~palmtree.ClipLossOutput`).
``cache_labels`` does nothing (no labels are materialised).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings

import torch
from torch import nn

from ..distributed import world
from ..loss import ClipLossOutput, clip_loss_with
from ..options import LossOptions, takes_options
from ..siglip import SigLipLossOutput, siglip_loss_with

#: The options a drop-in takes (palmtree's, keyword-only); open_clip's losses take exp'd,
#: uncapped scales and features the model normalised itself, so those two are fixed.
_OPTIONS = takes_options(
    only=("group", "backend", "precision", "chunk_size", "check_finite"),
    logit_scale_max=math.inf,
    normalize=False,
)

#: (local_loss, gather_with_grad) combinations already warned about in this process.
_WARNED: set[tuple[bool, bool]] = set()

_WRONG_FLAGS = {
    (False, False): (
        "each rank's features get the gradient of the global loss once instead of "
        "world_size times, so after DDP's average the image and text towers receive "
        "1/world_size of the true gradient while logit_scale receives all of its own"
    ),
    (True, False): (
        "the gathered features carry no gradient, so images receive only the gradient of "
        "the image->text cross-entropy and texts only that of the text->image one: half "
        "of the gradient is dropped and its direction changes"
    ),
}


def wrong_flags_reason(local_loss: bool, gather_with_grad: bool, world_size: int) -> str | None:
    """Why open_clip's ``ClipLoss`` with these flags has wrong gradients (``None`` if exact)."""
    if world_size <= 1:
        return None
    return _WRONG_FLAGS.get((bool(local_loss), bool(gather_with_grad)))


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss``, exact on any number of ranks and any split of the batch.

    Args:
        local_loss, gather_with_grad, cache_labels: accepted for compatibility and
            ignored (the result is always the exact global loss; see the module
            docstring). A wrong open_clip combination warns once on more than one rank.
        rank, world_size: checked against ``group`` when given (open_clip's training
            passes the launcher's values); the ranks and their number come from
            ``group``, the default process group unless one is passed.
        use_horovod: not supported (palmtree uses ``torch.distributed``).

    Of palmtree's options (below) ``precision="bf16"`` gives the speed of open_clip under
    bf16 autocast (the logits stay fp32 here).

    ``forward`` takes unit features ``[b, D]`` (not normalised again here, as in open_clip)
    and ``logit_scale`` = ``exp(log temperature)``, uncapped (open_clip's training clamps
    the parameter itself). It returns this rank's loss (``{"contrastive_loss": loss}``
    with ``output_dict=True``); the gradient reaching ``logit_scale`` is that of the
    exponentiated value, as in open_clip. ``self.last_output`` keeps the last
    :class:`~palmtree.ClipLossOutput`, detached, for logging the global loss.
    """

    @_OPTIONS
    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        use_horovod: bool = False,
        *,
        options: LossOptions,
    ):
        super().__init__()
        if use_horovod:
            raise ValueError(
                "use_horovod=True is not supported: palmtree's loss communicates through "
                "torch.distributed (launch with torchrun, or hvd's torch.distributed backend)"
            )
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.options = options.validated()
        self.last_output: ClipLossOutput | None = None

    def _warn_flags(self, world_size: int) -> None:
        key = (bool(self.local_loss), bool(self.gather_with_grad))
        why = wrong_flags_reason(*key, world_size)
        if why is None or key in _WARNED:
            return
        _WARNED.add(key)
        warnings.warn(
            f"open_clip's ClipLoss(local_loss={key[0]}, gather_with_grad={key[1]}) on "
            f"{world_size} ranks has wrong gradients: {why}. palmtree ignores both flags and "
            "computes the exact global loss, so training differs from open_clip with these "
            "flags. Pass local_loss=True, gather_with_grad=True to silence this warning.",
            UserWarning,
            stacklevel=2,
        )

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | None = None,
        output_dict: bool = False,
    ):
        # Problems go through the loss's input check so that every rank raises them,
        # instead of one rank raising while the others wait in a collective.
        error = None
        if logit_bias is not None:
            error = (
                "logit_bias is not supported: it belongs to SigLIP's sigmoid loss "
                "(open_clip's SigLipLoss), and this is the softmax CLIP loss"
            )
        rank, world_size = world(self.options.exchange_group)
        error = error or _world_error(self, rank, world_size)
        if error is None:
            self._warn_flags(world_size)
        out = clip_loss_with(
            self.options, image_features, text_features, _log(logit_scale), local_error=error
        )
        self.last_output = dataclasses.replace(out, loss=out.loss.detach())
        return {"contrastive_loss": out.loss} if output_dict else out.loss

    def extra_repr(self) -> str:
        opts = self.options
        return f"backend={opts.backend!r}, precision={opts.precision!r} (exact global loss)"


def _world_error(loss: nn.Module, rank: int, world_size: int) -> str | None:
    """open_clip's ``rank``/``world_size`` arguments against the process group's."""
    name = type(loss).__name__
    if loss.world_size is not None and loss.world_size != world_size:
        return (
            f"{name}(world_size={loss.world_size}) but the process group has "
            f"{world_size} rank(s); palmtree takes the negatives of every rank in the "
            "group (pass group= for a subset)"
        )
    if loss.rank is not None and loss.rank != rank:
        return f"{name}(rank={loss.rank}) but this process is rank {rank} of the group"
    return None


def _log(logit_scale):
    """open_clip passes ``exp(log temperature)``; palmtree's losses take the log."""
    if isinstance(logit_scale, torch.Tensor) and logit_scale.is_floating_point():
        return torch.log(logit_scale.float())
    if isinstance(logit_scale, numbers.Real) and not isinstance(logit_scale, bool):
        return math.log(logit_scale) if logit_scale > 0 else -math.inf
    return logit_scale  # the loss's own check reports what it is


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss``, exact on any number of ranks and any split of the batch.

    open_clip passes text blocks around a ring of equal-shape tensors (``dist_impl``
    ``"bidir"``, ``"shift"``, ``"reduce"`` or ``"gather"``) and divides each rank's sum by
    its own batch size; on equal splits that is rank ``r``'s ``N * share_r`` of the global
    sigmoid loss, which is what this class returns for *any* split, computed in one pass
    over the rank's rows against the gathered texts (:func:`palmtree.siglip_loss`).

    Args:
        cache_labels, dist_impl: accepted for compatibility and ignored (every
            ``dist_impl`` gives the same loss; no labels are materialised).
        rank, world_size: checked against ``group`` (open_clip's training passes the
            launcher's values; ``None`` skips the check). open_clip's defaults (0 and 1)
            describe one process: on more ranks, pass the real values or ``None``.

    ``forward(image_features, text_features, logit_scale, logit_bias, output_dict=False)``
    takes open_clip's meaning: unit features as the model gives them, ``logit_scale``
    already exponentiated, no cap. ``self.last_output`` keeps the last
    :class:`~palmtree.SigLipLossOutput`, detached (``loss_global`` is the global loss).
    """

    @_OPTIONS
    def __init__(
        self,
        cache_labels: bool = False,
        rank: int | None = 0,
        world_size: int | None = 1,
        dist_impl: str | None = None,
        *,
        options: LossOptions,
    ):
        super().__init__()
        if dist_impl not in (None, "bidir", "shift", "reduce", "gather"):
            raise ValueError(
                f"dist_impl must be one of 'bidir', 'shift', 'reduce', 'gather', got {dist_impl!r}"
            )
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        self.options = options.validated()
        self.last_output: SigLipLossOutput | None = None

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float,
        output_dict: bool = False,
    ):
        rank, world_size = world(self.options.exchange_group)
        out = siglip_loss_with(
            self.options,
            image_features,
            text_features,
            _log(logit_scale),
            logit_bias,
            local_error=_world_error(self, rank, world_size),
        )
        self.last_output = dataclasses.replace(out, loss=out.loss.detach())
        return {"contrastive_loss": out.loss} if output_dict else out.loss

    def extra_repr(self) -> str:
        opts = self.options
        return f"backend={opts.backend!r}, precision={opts.precision!r} (exact global loss)"
