"""What a rank trains and where the run stands: built fresh, restored, or saved.

A checkpoint (:mod:`.checkpoint` writes and checks the file) holds the model (towers and
the loss's temperature, projections and, for SigLIP, bias), the optimiser (and the
GradScaler), the position (epoch, optimiser steps done in it, global step; a step is
``--accum-steps`` micro-batches), every rank's RNG state, the tokenizer, the model
config and the flags, so ``--resume`` continues exactly where the run stopped.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint
from .config import RankContext, TrainConfig
from .data import Prepared, TrainError
from .models import DualEncoder, ModelConfig
from .step import build_optimizer

#: Flags that change the trajectory: resuming with other values continues the run,
#: but it will no longer match an uninterrupted one.
TRAJECTORY_FLAGS = (
    "batch_size",
    "accum_steps",
    "epochs",
    "lr",
    "wd",
    "warmup",
    "seed",
    "precision",
    "label_column",
)


@dataclass
class TrainState:
    """The model, its optimiser, and the position in the run (in optimiser steps)."""

    model: DualEncoder
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    resumed_from: Path | None = None

    def advance(self) -> None:
        self.step_in_epoch += 1
        self.global_step += 1

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0


def model_config(cfg: TrainConfig, prepared: Prepared, world_size: int) -> ModelConfig:
    """A new run's model: sizes from the flags, vocabulary and channels from the data."""
    return ModelConfig(
        in_channels=prepared.in_channels,
        image_width=cfg.image_width,
        image_dim=cfg.image_dim,
        vocab_size=len(prepared.tokenizer),
        context_length=prepared.tokenizer.context_length,
        text_width=cfg.text_width,
        text_layers=cfg.text_layers,
        text_heads=cfg.text_heads,
        embed_dim=cfg.embed_dim,
        loss=cfg.loss,
        **initial_temperature(cfg.loss, cfg.batch_size * cfg.accum_steps * world_size),
        backend=cfg.backend,
        same_label=cfg.same_label,
    )


def initial_temperature(loss: str, global_batch: int) -> dict[str, float]:
    """The initial ``logit_scale`` (log temperature) and, for SigLIP, ``logit_bias``.

    CLIP: ``ln(1/0.07)``, as CLIP and :class:`palmtree.ClipLoss`. SigLIP: ``ln 10`` and
    ``-ln(B - 1)`` for a global batch of ``B`` pairs, the log-odds of a pair being a
    positive (``B`` of the ``B^2`` pairs), where a model that knows nothing should start.
    SigLIP's own ``-10`` is that value for its batches of 32k; for the demo's 128 pairs
    it starts 5 lower. The bias moves by about ``--lr`` per step and cannot catch up;
    the towers instead pull every embedding together, which lifts all logits towards
    the prior, and the short run ends far from aligned (held-out zero-shot top-1 0.28
    with the demo's defaults, against 0.98 from this start).
    """
    if loss == "clip":
        return {"init_logit_scale": math.log(1 / 0.07)}
    return {
        "init_logit_scale": math.log(10.0),
        "init_logit_bias": -math.log(max(global_batch - 1, 1)),
    }


def restore(
    cfg: TrainConfig, prepared: Prepared, ctx: RankContext, steps_per_epoch: int
) -> TrainState:
    """A fresh state seeded with ``--seed``, or the state of the checkpoint ``--resume``
    names (its model config; ``--backend`` still applies, every backend being exact)."""
    path = checkpoint.resolve_resume(cfg.resume, cfg.run_dir)
    saved = checkpoint.load(path) if path else None
    torch.manual_seed(cfg.seed)
    if saved:
        config = ModelConfig(**saved["model_config"])
    else:
        config = model_config(cfg, prepared, ctx.world_size)
    model = DualEncoder(replace(config, backend=cfg.backend)).to(ctx.device)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "amp" else None
    state = TrainState(model, build_optimizer(model, cfg.lr, cfg.wd), scaler)
    if saved is not None:
        _load(state, saved, path, steps_per_epoch, ctx)
        _warn_about_differences(saved, cfg, ctx)
    return state


def _moments_shaped_as_params(optimizer: torch.optim.Optimizer) -> None:
    """A checkpoint from before the loss's scalars became ``[1]``-shaped holds their
    optimiser moments 0-dim: shaped as their parameters now (``step`` stays a count)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            moments = optimizer.state.get(param, {})
            for key, value in moments.items():
                if key != "step" and isinstance(value, torch.Tensor) and value.ndim == 0:
                    if param.numel() == 1:
                        moments[key] = value.reshape(param.shape)


def _load(state: TrainState, saved: dict, path: Path, steps_per_epoch: int, ctx) -> None:
    try:
        state.model.load_state_dict(saved["model"])
        state.optimizer.load_state_dict(saved["optimizer"])
        _moments_shaped_as_params(state.optimizer)
        if state.scaler is not None and "scaler" in saved:
            state.scaler.load_state_dict(saved["scaler"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise TrainError(
            f"{path}: its weights or optimizer state do not fit its model config: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    state.epoch, state.step_in_epoch = int(saved["epoch"]), int(saved["step_in_epoch"])
    state.global_step = int(saved["global_step"])
    state.resumed_from = path
    if state.step_in_epoch >= steps_per_epoch:  # saved at the end of an epoch
        state.next_epoch()
    rngs = saved["rng"]
    if len(rngs) == ctx.world_size:  # else each rank keeps its fresh --seed state
        checkpoint.set_rng_state(rngs[ctx.rank])


def _warn_about_differences(saved: dict, cfg: TrainConfig, ctx: RankContext) -> None:
    before, now = saved.get("args", {}), cfg.flags()
    diffs = [
        f"--{k.replace('_', '-')} {before[k]} -> {now.get(k)}"
        for k in TRAJECTORY_FLAGS
        if k in before and before[k] != now.get(k)
    ]
    if saved["world_size"] != ctx.world_size:
        diffs.append(f"world size {saved['world_size']} -> {ctx.world_size}")
    if diffs and ctx.is_main:
        print(
            f"palmtree train: warning: resuming with {', '.join(diffs)}; the run goes on "
            "but will not match an uninterrupted run",
            file=sys.stderr,
        )


def save(
    state: TrainState,
    cfg: TrainConfig,
    prepared: Prepared,
    ctx: RankContext,
    alias: str | None = None,
) -> None:
    """Writes ``checkpoints/latest.pt`` (rank 0), also as ``alias`` when given.

    A collective: every rank sends its RNG state to rank 0, so call it on every rank.
    """
    rngs = [checkpoint.rng_state()]
    if ctx.distributed:
        rngs = [None] * ctx.world_size
        dist.all_gather_object(rngs, checkpoint.rng_state())
    if not ctx.is_main:
        return
    obj = {
        "format": checkpoint.FORMAT,
        "epoch": state.epoch,
        "step_in_epoch": state.step_in_epoch,
        "global_step": state.global_step,
        "world_size": ctx.world_size,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "rng": rngs,
        "tokenizer": prepared.tokenizer.state_dict(),
        "model_config": state.model.config.to_dict(),
        "args": cfg.flags(),
    }
    if state.scaler is not None:
        obj["scaler"] = state.scaler.state_dict()
    latest = cfg.run_dir / "checkpoints" / "latest.pt"
    checkpoint.save_atomic(obj, latest)
    if alias is not None:
        checkpoint.keep_as(latest, alias)
