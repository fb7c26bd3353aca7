"""What every rank runs: restore, then step through the epochs, evaluating and
checkpointing at the end of each; rank 0 reports.

A step is one optimiser step on a global batch of ``--batch-size x --accum-steps x
ranks`` pairs; ``--max-steps`` and the checkpoints count these steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .config import RankContext, TrainConfig
from .data import Collate, GlobalBatchSampler, Prepared
from .evaluate import evaluate
from .report import Report
from .state import TrainState, restore, save
from .step import Stepper, lr_at


def train_rank(ctx: RankContext, cfg: TrainConfig, prepared: Prepared, t0: float) -> dict | None:
    """Trains on this rank (a collective: every rank of the world calls it).

    Rank 0 writes the run's files and returns the results dict, the others ``None``;
    it returns with its DDP model gone, as :mod:`palmtree.launch_utils` needs. ``t0``
    is when the command started (for ``wall_seconds``).
    """
    batches = Batches(prepared, cfg, ctx)
    state = restore(cfg, prepared, ctx, batches.steps_per_epoch)
    stepper = Stepper(state.model, state.optimizer, state.scaler, cfg, ctx)
    report = Report(cfg, ctx, prepared, batches.steps_per_epoch)
    total_steps = batches.steps_per_epoch * cfg.epochs

    report.open_progress(state.global_step)
    stopped = False
    state.model.train()
    while state.epoch < cfg.epochs and not stopped:
        report.start_epoch()
        for micro_batches in batches.epoch(state.epoch, state.step_in_epoch):
            lr = lr_at(state.global_step, cfg.lr, cfg.warmup, total_steps)
            metrics = stepper(micro_batches, lr)
            state.advance()
            report.step(metrics, lr, state)
            if cfg.max_steps is not None and state.global_step >= cfg.max_steps:
                # Stopped as if killed here, unless this was the run's last step anyway.
                stopped = (
                    state.step_in_epoch < batches.steps_per_epoch or state.epoch + 1 < cfg.epochs
                )
                break
        if state.step_in_epoch >= batches.steps_per_epoch:  # the epoch is complete
            report.evaluation(evaluate_held_out(state, prepared, cfg, ctx), state)
            save(state, cfg, prepared, ctx, alias=f"epoch_{state.epoch + 1}.pt")
            state.next_epoch()
        elif stopped:
            save(state, cfg, prepared, ctx)
    report.close()
    if not ctx.is_main:
        return None
    final = evaluate_held_out(state, prepared, cfg, ctx)
    return report.finish(state, final, completed=not stopped, t0=t0)


def evaluate_held_out(
    state: TrainState, prepared: Prepared, cfg: TrainConfig, ctx: RankContext
) -> dict | None:
    """Rank 0's held-out metrics (:func:`.evaluate.evaluate`); ``None`` on other ranks
    and without evaluation data."""
    if not ctx.is_main or prepared.test is None:
        return None
    return evaluate(state.model, prepared.test, prepared.class_prompts, ctx.device, cfg.amp_dtype)


class Batches:
    """This rank's micro-batches, ``--accum-steps`` per optimiser step (see
    :class:`~.data.GlobalBatchSampler`), loaded by a ``DataLoader``."""

    def __init__(self, prepared: Prepared, cfg: TrainConfig, ctx: RankContext) -> None:
        self.dataset = prepared.train
        self.sampler = GlobalBatchSampler(
            len(self.dataset),
            cfg.batch_size,
            ctx.rank,
            ctx.world_size,
            seed=cfg.seed,
            accum_steps=cfg.accum_steps,
        )
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=Collate(self.dataset.image_shape, labels=cfg.same_label is not None),
            num_workers=cfg.workers,
            pin_memory=ctx.device.type == "cuda",
        )
        self.accum_steps = cfg.accum_steps

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[list[dict]]:
        """The micro-batches of each remaining step of ``epoch``, from ``start_step``."""
        self.dataset.set_epoch(epoch)  # the caption each image gets this epoch
        self.sampler.set_epoch(epoch, start_step)
        step: list[dict] = []
        for micro_batch in self.loader:
            step.append(micro_batch)
            if len(step) == self.accum_steps:
                yield step
                step = []
