"""What every rank runs: the training loop, checkpoints, and (rank 0) metrics and results."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint
from .data import Collate, GlobalBatchSampler, Prepared
from .evaluate import evaluate
from .models import DualEncoder, ModelConfig

HIT_RULE = (
    "captions describe a class, so a retrieved item is a hit when it shows or describes "
    "the same digit (CSV data: the same caption text)"
)


@dataclass
class RankContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str  # "spawn", "torchrun" or "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def model_config(args, prepared: Prepared) -> ModelConfig:
    return ModelConfig(
        in_channels=prepared.in_channels,
        image_width=args.image_width,
        image_dim=args.image_dim,
        vocab_size=len(prepared.tokenizer),
        context_length=prepared.tokenizer.context_length,
        text_width=args.text_width,
        text_layers=args.text_layers,
        text_heads=args.text_heads,
        embed_dim=args.embed_dim,
        backend=args.backend,
    )


def build_optimizer(model: DualEncoder, lr: float, wd: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, embeddings' positions or the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        plain = p.ndim < 2 or "norm" in name or name.endswith("position") or "logit_scale" in name
        (no_decay if plain else decay).append(p)
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1 + math.cos(math.pi * min(1.0, progress)))


AMP_DTYPES = {"amp_bf16": torch.bfloat16, "amp": torch.float16}
# Flags that change the trajectory: resuming with other values continues the run,
# but it will no longer match an uninterrupted one.
TRAJECTORY_FLAGS = ("batch_size", "epochs", "lr", "wd", "warmup", "seed", "precision")


def _resume_differences(state: dict, args, world_size: int) -> list[str]:
    saved = state.get("args", {})
    diffs = [
        f"--{k.replace('_', '-')} {saved[k]} -> {getattr(args, k)}"
        for k in TRAJECTORY_FLAGS
        if k in saved and saved[k] != getattr(args, k)
    ]
    if state.get("world_size", world_size) != world_size:
        diffs.append(f"world size {state['world_size']} -> {world_size}")
    return diffs


def _gather_objects(obj, ctx: RankContext) -> list:
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


class MetricsLog:
    """``metrics.jsonl``, one JSON object per line, written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if keep_until_step is None:
            self.path.write_text("")
        elif self.path.exists():
            # Drop what a killed run logged after its last checkpoint.
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln)["step"] <= keep_until_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self.file = open(self.path, "a")

    def write(self, row: dict) -> None:
        if self.enabled:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()


def train_rank(ctx: RankContext, args, prepared: Prepared, t0: float) -> dict | None:
    """Trains on this rank; rank 0 returns the results dict, other ranks ``None``."""
    run_dir = Path(args.logs) / args.name
    is_main = ctx.rank == 0
    device = ctx.device
    resume_path = checkpoint.resolve_resume(args.resume, run_dir)
    state = checkpoint.load(resume_path) if resume_path else None

    torch.manual_seed(args.seed)
    config = ModelConfig(**state["model_config"]) if state else model_config(args, prepared)
    config.backend = args.backend  # every backend gives the same loss; the flag wins
    model = DualEncoder(config).to(device)
    optimizer = build_optimizer(model, args.lr, args.wd)
    amp_dtype = AMP_DTYPES.get(args.precision)
    scaler = torch.amp.GradScaler("cuda") if args.precision == "amp" else None

    train_set = prepared.train
    sampler = GlobalBatchSampler(
        len(train_set), args.batch_size, ctx.rank, ctx.world_size, seed=args.seed
    )
    steps_per_epoch = math.ceil(len(train_set) / sampler.global_batch)
    total_steps = steps_per_epoch * args.epochs
    epoch, step_in_epoch, global_step = 0, 0, 0
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        epoch, step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        global_step = int(state["global_step"])
        if step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        rngs = state.get("rng", [])
        if len(rngs) == ctx.world_size:
            checkpoint.set_rng_state(rngs[ctx.rank])
        diffs = _resume_differences(state, args, ctx.world_size)
        if diffs and is_main:
            print(
                f"palmtree train: warning: resuming with {', '.join(diffs)}; the run goes on "
                "but will not match an uninterrupted run",
                file=sys.stderr,
            )

    if ctx.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    else:
        ddp = model
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_sampler=sampler,
        collate_fn=Collate(train_set.image_shape),
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )
    log = MetricsLog(run_dir / "metrics.jsonl", is_main, global_step if state else None)

    def save(name: str) -> None:
        rngs = _gather_objects(checkpoint.rng_state(), ctx)
        if not is_main:
            return
        obj = {
            "format": checkpoint.FORMAT,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "world_size": ctx.world_size,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": rngs,
            "tokenizer": prepared.tokenizer.state_dict(),
            "model_config": config.to_dict(),
            "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))},
        }
        if scaler is not None:
            obj["scaler"] = scaler.state_dict()
        latest = run_dir / "checkpoints" / "latest.pt"
        checkpoint.save_atomic(obj, latest)
        checkpoint.keep_as(latest, name)

    def run_eval() -> dict | None:
        if prepared.test is None:
            return None
        return evaluate(model, prepared.test, prepared.class_prompts, device, amp_dtype)

    bar = None
    if is_main and not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total_steps,
            initial=global_step,
            unit="step",
            dynamic_ncols=True,
            desc=f"train {ctx.world_size} rank{'s' if ctx.world_size > 1 else ''}",
            mininterval=0.25,
        )

    train_start = time.time()
    samples = 0
    stopped = False
    model.train()
    last = {}
    while epoch < args.epochs and not stopped:
        train_set.set_epoch(epoch)
        sampler.set_epoch(epoch, step_in_epoch)
        tick = time.perf_counter()
        for batch in loader:
            lr = lr_at(global_step, args.lr, args.warmup, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = batch["images"].to(device, non_blocking=True)
            ids = batch["ids"].to(device, non_blocking=True)
            mask = batch["mask"].to(device, non_blocking=True)
            autocast = (
                torch.autocast(device.type, dtype=amp_dtype)
                if amp_dtype is not None
                else contextlib.nullcontext()
            )
            with autocast:
                out = ddp(images, ids, mask)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(out.loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                out.loss.backward()
                optimizer.step()
            with torch.no_grad():  # keep the parameter where the cap lets it move (CLIP)
                model.loss_fn.logit_scale.clamp_(0, math.log(config.logit_scale_max))
            step_in_epoch += 1
            global_step += 1
            samples += out.b_global
            metrics = out.metrics()
            now = time.perf_counter()
            last = {
                "kind": "train",
                "step": global_step,
                "epoch": round(epoch + step_in_epoch / steps_per_epoch, 4),
                "loss": metrics["loss"],
                "loss_i2t": metrics["loss_i2t"],
                "loss_t2i": metrics["loss_t2i"],
                "acc_i2t": metrics["acc_i2t"],
                "acc_t2i": metrics["acc_t2i"],
                "logit_scale": metrics["logit_scale"],
                "lr": lr,
                "b_global": metrics["b_global"],
                "samples_per_s": round(metrics["b_global"] / max(now - tick, 1e-9), 1),
            }
            tick = now
            log.write(last)
            if bar is not None:
                bar.set_postfix_str(
                    f"loss {last['loss']:.3f} acc {last['acc_i2t']:.2f}/{last['acc_t2i']:.2f} "
                    f"scale {last['logit_scale']:.1f} {last['samples_per_s']:.0f} pairs/s",
                    refresh=False,
                )
                bar.update(1)
            if args.max_steps is not None and global_step >= args.max_steps:
                stopped = step_in_epoch < steps_per_epoch or epoch + 1 < args.epochs
                break
        if step_in_epoch >= steps_per_epoch:  # the epoch is complete
            if is_main:
                ev = run_eval()
                if ev is not None:
                    log.write({"kind": "eval", "step": global_step, "epoch": epoch + 1, **ev})
                    if bar is not None:
                        zs = ev["zero_shot_top1"]
                        bar.set_description_str(
                            f"epoch {epoch + 1}/{args.epochs}"
                            + (f" zero-shot {zs:.3f}" if zs is not None else "")
                        )
            save(f"epoch_{epoch + 1}.pt")
            epoch, step_in_epoch = epoch + 1, 0
        elif stopped:
            save(f"step_{global_step}.pt")
    if bar is not None:
        bar.close()
    log.close()
    train_seconds = time.time() - train_start

    if not is_main:
        return None
    final = run_eval() or {}
    results = {
        "zero_shot_top1": final.get("zero_shot_top1"),
        "image_to_text_r1": final.get("image_to_text_r1"),
        "image_to_text_r5": final.get("image_to_text_r5"),
        "text_to_image_r1": final.get("text_to_image_r1"),
        "text_to_image_r5": final.get("text_to_image_r5"),
        "world_size": ctx.world_size,
        "epochs": args.epochs,
        "completed": not stopped,
        "steps": global_step,
        "wall_seconds": None,
        "train_seconds": round(train_seconds, 2),
        "pairs_seen_this_run": samples,
        "final_loss": last.get("loss"),
        "final_logit_scale": float(model.loss_fn.logit_scale.detach().exp()),
        "resumed_from": str(resume_path) if resume_path else None,
        "launcher": ctx.launcher,
        "device": str(device),
        "backend": args.backend,
        "precision": args.precision,
        "batch_size_per_rank": args.batch_size,
        "seed": args.seed,
        "data": prepared.report,
        "retrieval_hit_rule": HIT_RULE,
    }
    from .plot import plot_curves

    plot = plot_curves(
        run_dir / "metrics.jsonl",
        run_dir / "curves.png",
        title=f"palmtree train: {prepared.report.get('dataset', '')}, {ctx.world_size} ranks",
    )
    results["wall_seconds"] = round(time.time() - t0, 2)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_summary(results, run_dir, plot)
    return results


def print_summary(results: dict, run_dir: Path, plot: Path) -> None:
    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    state = "done" if results["completed"] else f"stopped at step {results['steps']}"
    lines = [
        f"palmtree train: {state} in {results['wall_seconds']:.1f} s on "
        f"{results['world_size']} rank(s) ({results['device']}), {results['epochs']} epochs, "
        f"{results['steps']} steps",
        f"  held-out zero-shot top-1:   {fmt(results['zero_shot_top1'])}",
        f"  image->text R@1 / R@5:      {fmt(results['image_to_text_r1'])} / "
        f"{fmt(results['image_to_text_r5'])}",
        f"  text->image R@1 / R@5:      {fmt(results['text_to_image_r1'])} / "
        f"{fmt(results['text_to_image_r5'])}",
        f"  ({HIT_RULE})",
        f"  results {run_dir / 'results.json'}, curves {plot}, "
        f"checkpoint {run_dir / 'checkpoints' / 'latest.pt'}",
    ]
    print("\n".join(lines), flush=True)
