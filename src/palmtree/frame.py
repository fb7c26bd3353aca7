"""What both losses hang on, so that each of ``loss.py`` and ``siglip.py`` holds only its
own math, output record, function and module.

A loss is a :class:`LossKind`: its name, its reference backend (materialised logits,
autograd) and its single-pass autograd Function. :func:`run` checks a call on every rank
(:func:`palmtree.call.prepare`) and computes it with the backend that runs;
:class:`LossModule` is the modules' base: the checked options, the projections into one
embedding width, and ``forward``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .backends import get_kernels
from .backends.chunks import WHOLE
from .call import NO_EXTRAS, Call, Extras, prepare
from .options import LossOptions
from .protocol import PassOptions
from .tracing import compiling


@dataclass(frozen=True)
class LossKind:
    """One loss: ``reference(image, text, negatives, *params, layout, precision, normalize,
    targets)`` and ``single_pass.apply(image, text, negatives, *params, PassOptions)`` both
    return ``(N * share_r, global metric sums)``; ``params`` is the scale, then SigLIP's
    bias; ``negatives`` is ``None`` or this rank's extra text columns."""

    name: str
    reference: Callable
    single_pass: type[torch.autograd.Function]


def run(
    kind: LossKind, opts: LossOptions, *inputs, extras: Extras = NO_EXTRAS
) -> tuple[Call, torch.Tensor, torch.Tensor]:
    """``(call, loss, sums)``: the call checked on every rank (``inputs`` and ``extras`` as
    :func:`~palmtree.call.prepare` takes them), then computed in fp32."""
    call = prepare(kind.name, opts, *inputs, extras=extras)
    params = (call.scale,) if call.bias is None else (call.scale, call.bias)
    features = (call.image, call.text, call.negatives)
    with torch.autocast(call.device.type, enabled=False):
        if call.backend == "reference":
            how = (call.layout, call.precision, opts.normalize, call.targets)
            loss, sums = kind.reference(*features, *params, *how)
        else:
            kernels = get_kernels(call.backend, fallback=opts.backend == "auto")
            chunk = opts.chunk_size
            if compiling() and call.layout.world_size > 1:
                chunk = WHOLE  # B is known only at run time: one chunk per rank
            how = PassOptions(
                kernels, call.layout, call.precision, chunk, opts.normalize, call.targets
            )
            loss, sums = kind.single_pass.apply(*features, *params, how)
    return call, loss, sums


@dataclass
class LossOutput:
    """What every loss returns; each loss's record adds its two parts (:attr:`PARTS`).

    ``loss`` is what this rank backpropagates: ``world_size * share_r``, where the
    per-rank shares add up to the global loss ``loss_global``. Data-parallel wrappers
    average gradients over ranks, so after that average every parameter holds exactly
    the gradient of the single-process loss on the whole global batch, even when ranks
    hold different numbers of pairs. Everything else is detached and global (identical
    on every rank); ``acc_i2t``/``acc_t2i`` are the fractions of rows/columns whose
    largest logit is the matching pair's.
    """

    loss: torch.Tensor
    loss_global: torch.Tensor
    acc_i2t: torch.Tensor
    acc_t2i: torch.Tensor
    logit_scale: torch.Tensor
    b_local: int
    b_global: int

    #: The names of the loss's two parts: the first two of the protocol's metric sums.
    PARTS: ClassVar[tuple[str, str]] = ("part_1", "part_2")

    @staticmethod
    def total(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """The global loss from its two parts."""
        raise NotImplementedError

    @classmethod
    def of(cls, call: Call, loss: torch.Tensor, sums: torch.Tensor, **extra):
        """The record of a computed call: ``sums`` are the global ``(first part, second
        part, i2t hits, t2i hits)``, each summed over the global batch."""
        B = call.layout.b_global
        first, second, acc_i2t, acc_t2i = (sums / B).unbind()
        parts = dict(zip(cls.PARTS, (first, second), strict=True))
        return cls(
            loss=loss,
            loss_global=cls.total(first, second),
            acc_i2t=acc_i2t,
            acc_t2i=acc_t2i,
            logit_scale=call.scale.detach(),
            b_local=call.layout.b_local,
            b_global=B,
            **parts,
            **extra,
        )

    def metrics(self) -> dict[str, float]:
        """Plain floats for logging (one host sync); ``loss`` is the global loss."""
        names = ("loss", *self.PARTS, "acc_i2t", "acc_t2i")
        values = [self.loss_global, *(getattr(self, p) for p in self.PARTS)]
        floats = torch.stack([*values, self.acc_i2t, self.acc_t2i]).tolist()
        metrics = dict(zip(names, floats, strict=True))
        metrics["logit_scale"] = float(self.logit_scale)
        if getattr(self, "logit_bias", None) is not None:
            metrics["logit_bias"] = float(self.logit_bias)
        return {**metrics, "b_local": self.b_local, "b_global": self.b_global}


class LossModule(nn.Module):
    """The loss modules' base: the checked options, and the bias-free linear maps that bring
    both towers into one embedding width.

    When ``image_dim``, ``text_dim`` and ``embed_dim`` are given, each side whose width
    differs from ``embed_dim`` gets a layer. Subclasses own their parameters and say, in
    :meth:`compute`, which loss they call with them.
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
        self.image_proj = _projection(image_dim, embed_dim)
        self.text_proj = _projection(text_dim, embed_dim)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Loads as ``nn.Module`` does, and also state dicts from before the learnable
        scalars became ``[1]``-shaped (FSDP2's ``fully_shard`` refuses 0-dim parameters):
        a 0-dim entry for a one-element parameter is read as that parameter's shape."""
        for name, param in self._parameters.items():
            value = state_dict.get(prefix + name)
            if (
                param is not None
                and param.numel() == 1
                and isinstance(value, torch.Tensor)
                and value.ndim == 0
            ):
                # ``load_state_dict`` hands each module its own copy of the dict.
                state_dict[prefix + name] = value.reshape(param.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        text_negatives: torch.Tensor | None = None,
        distributed: bool | None = None,
    ):
        """The loss of the projected features (token latents ``[b, L, D]`` with
        ``text_mask``), with this module's parameters. ``labels`` and ``text_negatives``
        as in :func:`palmtree.clip_loss` (the negatives go through the text projection);
        ``distributed=False`` for this call only computes it on this process alone."""
        image_features, text_features, error = self.project(image_features, text_features)
        if error is None and text_negatives is not None:
            _, text_negatives, error = self.project(None, text_negatives, "text_negatives")
        opts = self.options
        if distributed is not None and distributed != opts.distributed:
            opts = dataclasses.replace(opts, distributed=distributed)
        extras = Extras(labels, text_negatives)
        return self.compute(opts, image_features, text_features, text_mask, error, extras)

    def compute(self, opts, image_features, text_features, text_mask, error, extras):
        raise NotImplementedError

    def project(self, image_features, text_features, text_name: str = "text_features"):
        """``(image, text, error)``: both sides projected, or a width mismatch as a message
        (``None`` for a side passes through; ``text_name`` names the text side in it).

        Projecting before pooling is fine: a linear map commutes with the masked mean,
        and the loss then sees one width on both sides. A mismatch, or a projection that
        fails (a dtype the layer does not take), goes through the loss's exchange so that
        every rank raises it, not just this one.
        """
        for name, side, x, expected in (
            ("image_features", "image", image_features, self.image_dim),
            (text_name, "text", text_features, self.text_dim),
        ):
            if expected is not None and isinstance(x, torch.Tensor) and x.shape[-1] != expected:
                error = (
                    f"{name} have dim {x.shape[-1]} but this "
                    f"{type(self).__name__} was built with {side}_dim={expected}"
                )
                return image_features, text_features, error
        try:
            if self.image_proj is not None and image_features is not None:
                image_features = self.image_proj(image_features)
            if self.text_proj is not None:
                text_features = self.text_proj(text_features)
        except (RuntimeError, TypeError) as exc:
            return image_features, text_features, f"projecting the features failed: {exc}"
        return image_features, text_features, None

    def extra_repr(self) -> str:
        opts = self.options
        return (
            f"image_dim={self.image_dim}, text_dim={self.text_dim}, embed_dim={self.embed_dim}, "
            f"logit_scale_max={opts.logit_scale_max}, scale_cap={opts.scale_cap!r}, "
            f"backend={opts.backend!r}"
        )


def _projection(dim, embed_dim):
    if dim is None or dim == embed_dim:
        return None
    layer = nn.Linear(dim, embed_dim, bias=False)
    nn.init.normal_(layer.weight, std=dim**-0.5)
    return layer
