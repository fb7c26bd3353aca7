"""The training curves, drawn from ``metrics.jsonl`` with matplotlib (Agg, no display)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """``(train rows, eval rows)`` of a ``metrics.jsonl`` file."""
    train, evals = [], []
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                (evals if row.get("kind") == "eval" else train).append(row)
    return train, evals


def epoch_means(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Per-epoch mean of ``key`` weighted by the global batch, at each epoch's last step."""
    sums, weights, last = defaultdict(float), defaultdict(float), {}
    for r in rows:
        epoch = max(0, math.ceil(r["epoch"]) - 1)
        sums[epoch] += r[key] * r["b_global"]
        weights[epoch] += r["b_global"]
        last[epoch] = r["step"]
    epochs = sorted(sums)
    return [last[e] for e in epochs], [sums[e] / weights[e] for e in epochs]


def plot_curves(metrics_path: Path, out_path: Path, title: str = "") -> Path:
    """Draws the loss, the accuracies and the logit scale (and SigLIP's bias) of
    ``metrics_path`` side by side into the PNG ``out_path``; returns ``out_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), constrained_layout=True)
    _loss_panel(axes[0], train)
    _accuracy_panel(axes[1], train, evals)
    _scale_panel(axes[2], train)
    if title:
        fig.suptitle(title)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def _loss_panel(ax, train: list[dict]) -> None:
    """The loss per step, and its epoch means."""
    ax.plot(
        [r["step"] for r in train],
        [r["loss"] for r in train],
        lw=0.8,
        alpha=0.35,
        color="tab:blue",
        label="per step (the short last batch of an epoch dips)",
    )
    ax.plot(*epoch_means(train, "loss"), "o-", ms=3, color="tab:blue", label="epoch mean")
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss (global batch)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _accuracy_panel(ax, train: list[dict], evals: list[dict]) -> None:
    """The held-out metrics at each evaluation (those the run has), and the epoch means of
    the batch accuracies."""
    eval_steps = [r["step"] for r in evals]
    series = [
        ("zero_shot_top1", "held-out zero-shot top-1", "tab:green", "o-"),
        ("image_to_text_r1", "held-out image->text R@1", "tab:red", "s-"),
        ("text_to_image_r1", "held-out text->image R@1", "tab:orange", "^-"),
    ]
    for key, label, color, style in series:
        if evals and evals[0].get(key) is not None:
            ax.plot(eval_steps, [r[key] for r in evals], style, ms=3, color=color, label=label)
    for key, label, color in (
        ("acc_i2t", "batch acc image->text, exact pair (epoch mean)", "tab:gray"),
        ("acc_t2i", "batch acc text->image, exact pair (epoch mean)", "tab:brown"),
    ):
        ax.plot(*epoch_means(train, key), "--", lw=1, color=color, label=label)
    ax.set_xlabel("step")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")


def _scale_panel(ax, train: list[dict]) -> None:
    """The logit scale per step, and SigLIP's bias on a second axis."""
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["logit_scale"] for r in train], lw=1, color="tab:purple")
    ax.set_xlabel("step")
    ax.set_ylabel("logit scale exp(t) (cap 100)")
    ax.grid(alpha=0.3)
    if train and "logit_bias" in train[0]:  # SigLIP
        bias = ax.twinx()
        bias.plot(steps, [r["logit_bias"] for r in train], lw=1, color="tab:olive")
        bias.set_ylabel("logit bias b (SigLIP)", color="tab:olive")
