"""One optimiser step: AdamW with a linear warm-up and a cosine decay, plain or accumulated.

With ``--accum-steps 1``, each rank's batch goes through the DDP-wrapped model (towers
and loss) and one backward; the loss returns ``world_size x`` this rank's share, so
DDP's average is the gradient of the loss over the global batch.

With ``--accum-steps K > 1``, :func:`palmtree.accumulate` takes the rank's K
micro-batches: it encodes them without a graph, computes the loss once on the features
of every rank's micro-batches, then re-encodes each one to backpropagate its share. It
averages the towers' and the loss's gradients over the ranks itself (one all-reduce
each), so nothing is DDP-wrapped. Either way the optimiser steps on the exact gradient
of one loss over the whole global batch.

With ``--same-label``, each micro-batch's labels (``[b]`` ids) go with it: into the
loss call as ``labels=``, or to :func:`palmtree.accumulate` as one tensor per
micro-batch; the loss gathers them over the ranks with the features.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..accumulate import accumulate
from .config import RankContext, TrainConfig
from .models import Autocast, DualEncoder


def build_optimizer(model: DualEncoder, lr: float, wd: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases (the SigLIP bias included), norms, the text
    tower's positions or the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        plain = p.ndim < 2 or "norm" in name or name.endswith("position") or "logit_scale" in name
        (no_decay if plain else decay).append(p)
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1 + math.cos(math.pi * min(1.0, progress)))


class Stepper:
    """``stepper(micro_batches, lr)``: one optimiser step on this rank's micro-batches.

    ``micro_batches`` are the collated dicts (``images``, ``ids``, ``mask``, and with
    ``--same-label`` ``labels``) of one step,
    ``--accum-steps`` of them, any of which may be empty. A collective: every rank calls
    it once per step. Returns the loss's metrics over the global batch (plain floats,
    ``out.metrics()`` of its output record) as they were before the step.
    """

    def __init__(
        self,
        model: DualEncoder,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        cfg: TrainConfig,
        ctx: RankContext,
    ) -> None:
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.device, self.amp_dtype = ctx.device, cfg.amp_dtype
        self.labelled = cfg.same_label is not None
        self.accumulated = cfg.accum_steps > 1
        if self.accumulated:
            kind = ctx.device.type
            self.encode = Autocast(model.towers(), kind, cfg.amp_dtype)
            self.loss_fn = Autocast(model.loss_fn, kind, cfg.amp_dtype)
        elif ctx.distributed:
            cuda = ctx.device.type == "cuda"
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[ctx.device.index] if cuda else None
            )
        else:
            self.ddp = model

    def __call__(self, micro_batches: list[dict], lr: float) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        batches = [self._on_device(b) for b in micro_batches]
        labels = [self._labels(b) for b in micro_batches] if self.labelled else None
        out = self._backward(batches, labels)
        metrics = out.metrics()  # the step's own values, before the parameters move
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.model.clamp_logit_scale()
        return metrics

    def _backward(self, batches: list[tuple], labels: list[torch.Tensor] | None):
        """The loss's output record, with every parameter's gradient in place."""
        if self.accumulated:
            # A rank may hold fewer micro-batches than the others, or none: accumulate
            # takes any number, so the empty ones (the end of an epoch) are left out
            # (with their labels: a rank without micro-batches passes labels=[]).
            keep = [k for k, b in enumerate(batches) if len(b[0])]
            extra = {} if labels is None else {"labels": [labels[k] for k in keep]}
            return accumulate(self.encode, self.loss_fn, [batches[k] for k in keep], **extra)
        (batch,) = batches
        extra = {} if labels is None else {"labels": labels[0]}
        with self._autocast():
            out = self.ddp(*batch, **extra)
        loss = out.loss if self.scaler is None else self.scaler.scale(out.loss)
        loss.backward()
        return out

    def _on_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(batch[k].to(self.device, non_blocking=True) for k in ("images", "ids", "mask"))

    def _labels(self, batch: dict) -> torch.Tensor:
        return batch["labels"].to(self.device, non_blocking=True)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)
