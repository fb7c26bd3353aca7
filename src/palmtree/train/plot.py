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


# --------------------------------------------------------------------------- several runs

#: What each ``--same-label`` setting makes of the training loss (they are not one quantity).
LOSS_MEANING = {
    None: "no labels: same-digit pairs are negatives",
    "positive": "positive: target spread over same-label pairs,\nfloor = mean log|P|",
    "ignore": "ignore: same-label pairs leave the loss, floor 0",
}


def read_run(run_dir: Path) -> dict:
    """A run folder's ``results.json`` (``{}`` without one) and its metrics rows."""
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    train, evals = read_metrics(run_dir / "metrics.jsonl")
    return {"name": run_dir.name, "results": results, "train": train, "evals": evals}


def plot_runs(run_dirs: list[Path], out_path: Path, title: str = "") -> Path:
    """One figure comparing runs (e.g. without labels and with each ``--same-label``):
    each run's training loss in a panel of its own, with its own y axis (the losses of
    different settings are different quantities), then the held-out zero-shot top-1 (or,
    without classes, image->text R@1) of every run, the quantity they share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_run(Path(d)) for d in run_dirs]
    fig, axes = plt.subplots(
        1, len(runs) + 1, figsize=(3.6 * (len(runs) + 1), 3.6), constrained_layout=True
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, run, color in zip(axes, runs, colors, strict=False):
        ax.plot(*epoch_means(run["train"], "loss"), "o-", ms=3, color=color)
        mode = run["results"].get("same_label")
        ax.set_title(f"{run['name']}\n{LOSS_MEANING.get(mode, mode)}", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss, epoch mean")
        ax.grid(alpha=0.3)
    _shared_accuracy_panel(axes[-1], runs, colors)
    if title:
        fig.suptitle(title)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def _shared_accuracy_panel(ax, runs: list[dict], colors) -> None:
    key = "zero_shot_top1"
    if not any(r["evals"] and r["evals"][0].get(key) is not None for r in runs):
        key = "image_to_text_r1"
    for run, color in zip(runs, colors, strict=False):
        evals = [r for r in run["evals"] if r.get(key) is not None]
        seconds = run["results"].get("wall_seconds")
        label = run["name"] + (f" ({seconds:.0f} s wall)" if seconds is not None else "")
        if evals:
            label += f": {evals[-1][key]:.3f}"
        ax.plot(
            [r["step"] for r in evals],
            [r[key] for r in evals],
            "o-",
            ms=3,
            color=color,
            label=label,
        )
    what = {"zero_shot_top1": "zero-shot top-1", "image_to_text_r1": "image->text R@1"}[key]
    ax.set_title(f"held-out {what}: the comparable figure\n(final value in the legend)", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def main(argv: list[str] | None = None) -> int:
    """``python -m palmtree.train.plot RUN_DIR... --out PNG``: :func:`plot_runs`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m palmtree.train.plot",
        description="Compare palmtree train runs: their losses, each in its own panel, "
        "and their held-out accuracy in one.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (<logs>/<name>)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default="", help="the figure's title")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.runs if not (d / "metrics.jsonl").is_file()]
    if missing:
        parser.error(f"no metrics.jsonl in {', '.join(missing)}")
    print(plot_runs(args.runs, args.out, args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
