"""What rank 0 reports: ``metrics.jsonl``, the progress bar, and at the end
``results.json``, ``curves.png`` and the summary. On other ranks :class:`Report` does
nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .config import RankContext, TrainConfig
from .data import Prepared
from .state import TrainState

#: When a retrieved item counts as a hit, per kind of data.
HIT_RULES = {
    "digits": "captions describe a class, so a retrieved item is a hit when it shows or "
    "describes the same digit",
    "csv": "a retrieved item is a hit when it has the same caption text as the query",
}


class MetricsLog:
    """``metrics.jsonl``, one JSON object per line, appended by rank 0 only.

    A fresh run starts without one (a new folder, or one that ``--overwrite`` emptied);
    a resume finds it cut back to the checkpoint's step (:func:`~.rundir.prepare_run_dir`).
    """

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if enabled:
            self.file = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        if self.enabled:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()


class Report:
    """Rank 0's record of the run; every method is a no-op on the other ranks."""

    def __init__(
        self, cfg: TrainConfig, ctx: RankContext, prepared: Prepared, steps_per_epoch: int
    ) -> None:
        self.cfg, self.ctx, self.prepared = cfg, ctx, prepared
        self.steps_per_epoch = steps_per_epoch
        self.enabled = ctx.is_main
        self.log = MetricsLog(cfg.run_dir / "metrics.jsonl", self.enabled)
        self.bar = None
        self.started = time.time()
        self.tick = time.perf_counter()
        self.pairs = 0  # trained on by this run (not before a resume)

    def open_progress(self, initial_step: int) -> None:
        if not (self.enabled and self.cfg.progress):
            return
        from tqdm.auto import tqdm

        ranks = self.ctx.world_size
        self.bar = tqdm(
            total=self.steps_per_epoch * self.cfg.epochs,
            initial=initial_step,
            unit="step",
            dynamic_ncols=True,
            desc=f"train {ranks} rank{'s' if ranks > 1 else ''}",
            mininterval=0.25,
        )

    def start_epoch(self) -> None:
        self.tick = time.perf_counter()  # pairs/s leaves out evaluations and checkpoints

    def step(self, metrics: dict, lr: float, state: TrainState) -> None:
        """One ``metrics.jsonl`` row for the optimiser step just taken, from the loss's
        ``metrics()``: CLIP rows hold ``loss_i2t/_t2i``, SigLIP rows ``loss_pos/_neg``
        and ``logit_bias``."""
        self.pairs += metrics["b_global"]
        if not self.enabled:
            return
        now = time.perf_counter()
        row = {
            "kind": "train",
            "step": state.global_step,
            "epoch": round(state.epoch + state.step_in_epoch / self.steps_per_epoch, 4),
            **{k: v for k, v in metrics.items() if k not in ("b_local", "b_global")},
            "lr": lr,
            "b_global": metrics["b_global"],
            "samples_per_s": round(metrics["b_global"] / max(now - self.tick, 1e-9), 1),
        }
        self.tick = now
        self.log.write(row)
        if self.bar is not None:
            bias = f" bias {row['logit_bias']:.1f}" if "logit_bias" in row else ""
            self.bar.set_postfix_str(
                f"loss {row['loss']:.3f} acc {row['acc_i2t']:.2f}/{row['acc_t2i']:.2f} "
                f"scale {row['logit_scale']:.1f}{bias} {row['samples_per_s']:.0f} pairs/s",
                refresh=False,
            )
            self.bar.update(1)

    def evaluation(self, metrics: dict | None, state: TrainState) -> None:
        """The held-out metrics at the end of epoch ``state.epoch`` (``None``: no data)."""
        if not self.enabled or metrics is None:
            return
        epoch = state.epoch + 1
        self.log.write({"kind": "eval", "step": state.global_step, "epoch": epoch, **metrics})
        if self.bar is not None:
            zs = metrics["zero_shot_top1"]
            self.bar.set_description_str(
                f"epoch {epoch}/{self.cfg.epochs}"
                + (f" zero-shot {zs:.3f}" if zs is not None else "")
            )

    def close(self) -> None:
        """Ends the progress bar and the metrics log; the training time stops here."""
        if self.bar is not None:
            self.bar.close()
        self.log.close()
        self.train_seconds = time.time() - self.started

    def finish(self, state: TrainState, final: dict | None, completed: bool, t0: float) -> dict:
        """Writes ``results.json`` and ``curves.png``, prints the summary; returns the
        results. ``final`` holds the held-out metrics of the final model (``None``: no
        evaluation data); ``t0`` is when the command started."""
        results = self._results(state, final or {}, completed)
        from .plot import plot_curves

        run_dir = self.cfg.run_dir
        plot = plot_curves(
            run_dir / "metrics.jsonl",
            run_dir / "curves.png",
            title=f"palmtree train: {self.prepared.report.get('dataset', '')}, "
            f"{self.cfg.loss} loss, {self.ctx.world_size} ranks"
            + (f", --same-label {self.cfg.same_label}" if self.cfg.same_label else ""),
        )
        results["wall_seconds"] = round(time.time() - t0, 2)
        (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(summary(results, self.prepared.kind, run_dir, plot), flush=True)
        return results

    def _results(self, state: TrainState, final: dict, completed: bool) -> dict:
        cfg, loss_fn = self.cfg, state.model.loss_fn
        bias = getattr(loss_fn, "logit_bias", None)
        keys = ("zero_shot_top1", "image_to_text_r1", "image_to_text_r5")
        keys += ("text_to_image_r1", "text_to_image_r5")
        return {
            **{k: final.get(k) for k in keys},
            "world_size": self.ctx.world_size,
            "epochs": cfg.epochs,
            "completed": completed,
            "steps": state.global_step,
            "wall_seconds": None,
            "train_seconds": round(self.train_seconds, 2),
            "pairs_seen_this_run": self.pairs,
            "train_loss_last_epoch": last_epoch_loss(
                cfg.run_dir / "metrics.jsonl",
                state.global_step - state.step_in_epoch,
                self.steps_per_epoch,
            ),
            "final_logit_scale": float(loss_fn.logit_scale.detach().exp()),
            "final_logit_bias": None if bias is None else float(bias.detach()),
            "resumed_from": str(state.resumed_from) if state.resumed_from else None,
            "launcher": self.ctx.launcher,
            "device": str(self.ctx.device),
            "loss": cfg.loss,
            "backend": cfg.backend,
            "precision": cfg.precision,
            "batch_size_per_rank": cfg.batch_size,
            "accum_steps": cfg.accum_steps,
            "same_label": cfg.same_label,
            "label_column": cfg.label_column,
            "seed": cfg.seed,
            "data": self.prepared.report,
            "retrieval_hit_rule": HIT_RULES[self.prepared.kind],
        }


def last_epoch_loss(metrics: Path, end_step: int, steps_per_epoch: int) -> float | None:
    """The training loss of the epoch that ends at optimiser step ``end_step``: the mean
    of its steps' global losses weighted by their pairs, i.e. the mean over the epoch's
    pairs, which the short last batch does not skew. Read from ``metrics.jsonl``, so a
    resumed run reports what an uninterrupted one does; ``None`` before the first
    complete epoch, or when the log lacks some of its steps."""
    first = end_step - steps_per_epoch + 1
    if first < 1 or not metrics.exists():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = {r["step"]: r for r in rows if r.get("kind") == "train" and r["step"] >= first}
    epoch = [steps[s] for s in range(first, end_step + 1) if s in steps]
    if len(epoch) < steps_per_epoch:
        return None
    pairs = sum(r["b_global"] for r in epoch)
    return sum(r["loss"] * r["b_global"] for r in epoch) / pairs if pairs else None


def summary(results: dict, kind: str, run_dir: Path, plot: Path) -> str:
    """The lines printed at the end of a run, worded for the digits or for CSV data."""

    def recall(direction: str) -> str:
        r1, r5 = results[f"{direction}_r1"], results[f"{direction}_r5"]
        return "n/a" if r1 is None else f"{r1:.3f} / {r5:.3f}"

    state = "done" if results["completed"] else f"stopped at step {results['steps']}"
    accum = results["accum_steps"]
    steps = f"{results['steps']} steps" + (f" of {accum} micro-batches" if accum > 1 else "")
    if results["same_label"] is not None:
        steps += f", --same-label {results['same_label']}"
    lines = [
        f"palmtree train: {state} in {results['wall_seconds']:.1f} s on "
        f"{results['world_size']} rank(s) ({results['device']}), {results['loss']} loss, "
        f"{results['epochs']} epochs, {steps}"
    ]
    if results["train_loss_last_epoch"] is not None:
        lines.append(f"  training loss, last epoch:  {results['train_loss_last_epoch']:.4f}")
    if kind == "digits":
        lines += [
            f"  held-out zero-shot top-1:   {results['zero_shot_top1']:.3f}",
            f"  image->text R@1 / R@5:      {recall('image_to_text')}",
            f"  text->image R@1 / R@5:      {recall('text_to_image')}",
            f"  ({HIT_RULES[kind]})",
        ]
    elif results["image_to_text_r1"] is not None:
        lines += [
            f"  --val-data image->text R@1 / R@5:  {recall('image_to_text')}",
            f"  --val-data text->image R@1 / R@5:  {recall('text_to_image')}",
            f"  ({HIT_RULES[kind]}; free-form captions have no zero-shot classes)",
        ]
    else:
        lines.append("  no evaluation: --val-data names the pairs to measure retrieval on")
    lines.append(
        f"  results {run_dir / 'results.json'}, curves {plot}, "
        f"checkpoint {run_dir / 'checkpoints' / 'latest.pt'}"
    )
    return "\n".join(lines)
