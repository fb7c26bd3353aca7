"""The second pass's gradients into ``encode``: kept apart from what ``.grad`` held until
every rank has re-encoded every micro-batch, then averaged over the ranks in one all-reduce
and added.

At the first backward that reaches a parameter, its ``.grad`` is set aside (the tensor
itself, not a copy) and the second pass accumulates into a fresh one, exactly as a plain
backward would (same memory); at the end that sum is taken out and the original put back,
before the sum is averaged and added to it. A failure anywhere puts the originals back
untouched. A DDP-wrapped ``encode`` re-encodes under ``no_sync`` and is averaged here
instead of by its reducer: ranks may hold different numbers of micro-batches (none
included), and DDP's all-reduce, tied to a backward, would wait for the missing ones.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import ClipLossInputError
from .loss_step import leaf_parameters, module_of
from .ranks import Failure, Ranks


class TowerGradients:
    def __init__(self, encode, ranks: Ranks):
        self.module = module_of(encode)
        ddp = isinstance(self.module, nn.parallel.DistributedDataParallel)
        self.ddp = self.module if ddp else None
        self.ranks = ranks
        self.error = None  # this rank's reason to refuse, agreed on with the others
        self.params: list[torch.Tensor] = []
        self.extra: list[torch.Tensor] | None = None
        self.set_aside: dict[int, tuple] = {}  # id(param) -> (param, the .grad it had)
        self.inner = self.ddp.module if self.ddp is not None else self.module
        if self.module is not None:
            self.params = [p for p in self.inner.parameters() if p.requires_grad]
        elif ranks.size > 1:
            self.error = (
                "with several ranks, encode must be a module (DDP-wrapped or not) or a bound "
                "method of one, so that its parameters' gradients can be averaged"
            )
        #: Whether DDP broadcasts rank 0's buffers in the next forward (the first encoding:
        #: after a forward without grad or under no_sync it stops until a synced forward).
        #: Every rank must then make that forward, so hold the same number of micro-batches.
        self.broadcasts_buffers = bool(
            ddp and ranks.size > 1 and self.ddp.will_sync_module_buffers()
        )

    def no_sync(self):
        return self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()

    def add(self, features, grads) -> None:
        """Backpropagates one micro-batch's slice of the cached gradients."""
        outputs = (*features[:2], *features[3:])  # the mask has no gradient
        pairs = [(f, g) for f, g in zip(outputs, grads, strict=True) if f.requires_grad]
        if not pairs:
            return
        outputs, upstream = [f for f, _ in pairs], [g for _, g in pairs]
        inputs = self._inputs(outputs)
        for p in inputs:
            if id(p) not in self.set_aside:
                self.set_aside[id(p)] = (p, p.grad)
                p.grad = None
        torch.autograd.backward(outputs, upstream, inputs=inputs)

    def put_back(self) -> list[tuple]:
        """Every ``.grad`` as it was before the call; returns ``(param, what the second
        pass summed)`` for the parameters it reached."""
        sums = []
        for p, original in self.set_aside.values():
            if p.grad is not None:
                sums.append((p, p.grad))
            p.grad = original
        self.set_aside = {}
        return sums

    def _inputs(self, outputs) -> list[torch.Tensor]:
        """The module's parameters, and (one rank only) whatever else the features need."""
        if self.module is None:
            return leaf_parameters(outputs)
        if self.extra is None:  # once per call: what backward() would also have reached
            known = {id(p) for p in self.params}
            self.extra = [x for x in leaf_parameters(outputs) if id(x) not in known]
            if self.extra and self.ranks.size > 1:
                raise ClipLossInputError(
                    f"encode's features depend on {len(self.extra)} tensor(s) that require "
                    "grad outside its module, whose gradients accumulate cannot average over "
                    "the ranks: make them parameters of the module"
                )
        return self.params + self.extra

    def finish(self, loss_params, loss_grads, failure: Failure | None) -> None:
        """Raises on every rank if any rank failed; else adds the towers' gradients (and
        those of a ``loss_fn`` DDP does not average), averaged over the ranks, to ``.grad``."""
        if self.ranks.any_failed(failure):
            self.ranks.raise_failures(failure)  # accumulate puts the gradients back
        sums = self.put_back()
        if self.ranks.size == 1:
            for p, g in sums:
                _add_grad(p, g, owned=True)
            for p, g in zip(loss_params, loss_grads, strict=True):
                if g is not None:
                    _add_grad(p, g, owned=False)
            return
        params = self.params + list(loss_params)
        by_id = {id(p): g for p, g in sums}
        grads = [by_id.pop(id(p), None) for p in self.params] + list(loss_grads)
        pairs = zip(params, grads, strict=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in pairs]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        sizes = [g.numel() for g in grads]
        del grads, sums, by_id, pairs  # the sums now live in flat only
        dist.all_reduce(flat, group=self.ranks.group)
        flat /= self.ranks.size
        for p, g in zip(params, flat.split(sizes), strict=True):
            _add_grad(p, g.view_as(p), owned=False)


def _add_grad(p: torch.Tensor, g: torch.Tensor, owned: bool) -> None:
    """``p.grad += g`` in place, as autograd accumulates; ``g`` (a copy unless ``owned``)
    becomes ``.grad`` where there is none."""
    with torch.no_grad():
        if p.grad is None:
            p.grad = g.to(p.dtype, copy=not owned)
        else:
            p.grad.add_(g.to(p.grad.dtype))


def warn_batch_norm(encode) -> None:
    module = module_of(encode)
    if module is None:
        return
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if any(m.training for m in norms):
        warnings.warn(
            "accumulate: encode holds BatchNorm layers in training mode; their batch "
            "statistics come from each micro-batch, not the global batch, so the gradient "
            "is not the one of a single large batch (use LayerNorm, or eval-mode BatchNorm)",
            UserWarning,
            stacklevel=3,
        )
