"""Peak memory and time per training step of the demo towers against the global batch,
with and without ``palmtree.accumulate``.

    python benchmarks/accumulate.py                       # the default sweep (CPU)
    python benchmarks/accumulate.py --quick --out DIR     # tiny sizes, seconds

The model is the one ``palmtree train`` builds for the digits (``palmtree.train.models``
with its defaults: a CNN on 8x8 images, a 2-layer Transformer on word tokens,
``ClipLoss`` with its projections, the ``chunked`` backend), on random inputs of the
digits' shapes: 8x8 images and captions of 1 to 9 words. One training step is
``zero_grad``, the gradients, and one AdamW step:

* ``plain``: one forward and backward of the whole global batch;
* ``accumulate``: ``palmtree.accumulate`` over micro-batches of ``--micro-batch`` pairs
  (encode all without a graph, the loss once on the cached features, re-encode each with
  a graph and backpropagate its slice of the features' gradients).

Each (mode, global batch) runs in a fresh process, as ``palmtree bench`` runs its cases:
one small step first (thread pools, lazy state), then the address space is capped at
its current size plus ``--mem-limit-mb`` (``palmtree.bench.measure.limit_address_space``,
so that a step too large fails as ``oom`` instead of waking the kernel's OOM killer),
the peak RSS is reset, and ``--warmup`` untimed and ``--steps`` timed steps run. Peak
memory is the growth of the peak RSS over the model, the optimiser and the global
batch's inputs (``palmtree.bench.measure.PeakMemory``); time is the median step.

Writes ``<out>/<name>.csv`` (one row per mode and global batch), ``<name>.md`` (the
table) and ``<name>.png`` (memory and time against the global batch). Nothing here is
imported by the library.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

import palmtree
from palmtree.bench.cli import device_name
from palmtree.bench.measure import (
    RESULT_MARK,
    PeakMemory,
    is_oom,
    limit_address_space,
    one_line,
    run_worker,
)
from palmtree.train.models import DualEncoder, ModelConfig

MODES = ("plain", "accumulate")
#: The longest caption, in words: the digits' training captions have 1 to 9.
MAX_WORDS = 9
#: Marks the worker's result line on its stdout.
FIELDS = (
    "timestamp",
    "device",
    "torch_version",
    "palmtree_version",
    "mode",
    "global_batch",
    "micro_batch",
    "tokens",
    "steps",
    "median_ms",
    "min_ms",
    "peak_mb",
    "features_mb",
    "mem_limit_mb",
    "loss",
    "status",
    "note",
)
#: The default sweep: plain training of the demo towers needs about 0.15 MB per pair, so
#: under a 2 GB cap it fits up to B = 8192 and fails at 16384. B = 512, one micro-batch,
#: gives the activations of one micro-batch (plain) to compare accumulation's peak with.
DEFAULTS = dict(
    global_batches=[512, 1024, 2048, 4096, 8192, 16384, 32768],
    micro_batch=512,
    mem_limit_mb=2048,
    steps=3,
    warmup=1,
)
QUICK = dict(global_batches=[16, 32], micro_batch=8, mem_limit_mb=None, steps=1, warmup=0)


@dataclass(frozen=True)
class Case:
    """One measurement (JSON-serialisable, for the worker process)."""

    mode: str
    global_batch: int
    micro_batch: int
    steps: int
    warmup: int
    seed: int = 0
    mem_limit_mb: int | None = None
    threads: int | None = None


# --------------------------------------------------------------------------- the workload


def make_model(seed: int) -> DualEncoder:
    """The demo's towers and loss: ``ModelConfig``'s defaults (those of ``palmtree train``
    on the digits), the ``chunked`` backend."""
    torch.manual_seed(seed)
    return DualEncoder(ModelConfig(backend="chunked"))


def make_batch(size: int, seed: int):
    """``size`` random 8x8 images in [-1, 1] and random captions: token ids uniform over
    the vocabulary, lengths uniform in 1..``MAX_WORDS``, padded with 0."""
    config = ModelConfig()
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(size, config.in_channels, 8, 8, generator=g) * 2 - 1
    ids = torch.randint(1, config.vocab_size, (size, MAX_WORDS), generator=g)
    lengths = torch.randint(1, MAX_WORDS + 1, (size, 1), generator=g)
    mask = torch.arange(MAX_WORDS) < lengths
    return images, ids * mask, mask


class Towers(nn.Module):
    """``accumulate``'s ``encode``: the model's two towers, the loss left out."""

    def __init__(self, model: DualEncoder):
        super().__init__()
        self.image, self.text = model.image, model.text

    def forward(self, images, ids, mask):
        return self.image(images), self.text(ids, mask), mask


def gradients(case: Case, model: DualEncoder, batch) -> torch.Tensor:
    """The step's gradients by ``case.mode``; returns the (detached) loss."""
    if case.mode == "plain":
        out = model(*batch)
        out.loss.backward()
        return out.loss.detach()
    micro = micro_batches(batch, case.micro_batch)
    return palmtree.accumulate(Towers(model), model.loss_fn, micro).loss


def micro_batches(batch: tuple, size: int) -> list[tuple]:
    """The global batch's consecutive slices of ``size`` pairs (the last may be smaller)."""
    return [tuple(x[i : i + size] for x in batch) for i in range(0, len(batch[0]), size)]


def features_mb(batch, config: ModelConfig) -> float:
    """The cached features of the global batch: image ``[B, image_dim]`` and text token
    latents ``[B, L, text_width]``, fp32 (what ``accumulate`` keeps besides one
    micro-batch's activations, the ``O(B x D)`` term)."""
    big, length = batch[1].shape
    return big * (config.image_dim + length * config.text_width) * 4 / 2**20


# --------------------------------------------------------------------------- one case


def run_case(case: Case) -> dict:
    """Measures one case in this process; ``status`` ``ok`` or ``oom``."""
    if case.threads:
        torch.set_num_threads(case.threads)
    model = make_model(case.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = make_batch(case.global_batch, case.seed)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = gradients(case, model, batch)
        optimizer.step()
        return loss

    # A small step's gradients first (no optimiser step: the parameters stay those of the
    # seed), so that thread pools and other lazy state are not counted as the step's.
    small = Case(**dict(asdict(case), global_batch=min(8, case.global_batch), micro_batch=4))
    gradients(small, model, make_batch(small.global_batch, case.seed + 1))

    result = dict(features_mb=features_mb(batch, model.config), tokens=batch[1].shape[1])
    memory = PeakMemory(torch.device("cpu"))
    if case.mem_limit_mb:
        limit_address_space(case.mem_limit_mb)
    memory.start()
    times, first = [], None
    try:
        for i in range(case.warmup + case.steps):
            t0 = time.perf_counter()
            loss = step()
            if i >= case.warmup:
                times.append((time.perf_counter() - t0) * 1e3)
            first = float(loss) if first is None else first
    except Exception as exc:  # running out of memory is a result
        if not is_oom(exc):
            raise
        return dict(result, status="oom", note=one_line(exc))
    return dict(
        result,
        status="ok",
        note="",
        steps=len(times),
        median_ms=statistics.median(times),
        min_ms=min(times),
        peak_mb=memory.peak_mb(),
        loss=first,
    )


def run_in_process(case: Case, timeout: float) -> dict:
    """``run_case`` in a fresh Python process, so that the peak RSS is the case's own."""
    return run_worker([sys.executable, __file__, "--case", json.dumps(asdict(case))], timeout)


def worker(case_json: str) -> int:
    """``accumulate.py --case JSON``: one case, its result on one stdout line."""
    try:
        result = run_case(Case(**json.loads(case_json)))
    except Exception as exc:
        result = dict(status="error", note=one_line(exc))
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------- the sweep


def sweep(args) -> list[dict]:
    """Every mode at every global batch, ascending; a mode that ran out of memory at some
    batch is not run at larger ones (an ``oom`` row says so)."""
    rows, failed = [], {}
    common = dict(
        timestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        device=device_name(torch.device("cpu")),
        torch_version=torch.__version__,
        palmtree_version=palmtree.__version__,
        mem_limit_mb=args.mem_limit_mb or "",
    )
    for big in sorted(args.global_batches):
        for mode in MODES:
            micro = args.micro_batch if mode == "accumulate" else big
            case = Case(
                mode=mode,
                global_batch=big,
                micro_batch=micro,
                steps=args.steps,
                warmup=args.warmup,
                seed=args.seed,
                mem_limit_mb=args.mem_limit_mb,
                threads=args.threads,
            )
            if mode in failed:
                result = dict(status="oom", note=f"not run: out of memory at B={failed[mode]}")
            else:
                result = run_in_process(case, args.case_timeout)
            if result["status"] == "oom":
                failed.setdefault(mode, big)
            rows.append(dict(common, mode=mode, global_batch=big, micro_batch=micro, **result))
            print_row(rows[-1])
    return rows


def print_row(row: dict) -> None:
    """One line per case as it finishes."""
    what = f"{row['mode']:>10} B={row['global_batch']:<6} micro={row['micro_batch']:<6}"
    if row["status"] != "ok":
        print(f"{what} {row['status']}: {row['note']}", flush=True)
        return
    print(
        f"{what} {row['median_ms']:9.0f} ms {row['peak_mb']:8.0f} MB "
        f"(features {row['features_mb']:.0f} MB)  loss {row['loss']:.5f}",
        flush=True,
    )


# --------------------------------------------------------------------------- the report


def write_csv(rows: list[dict], path: Path) -> None:
    """The rows, columns :data:`FIELDS`, into a new file at ``path``."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in FIELDS})


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict]) -> str:
    """One line per global batch: each mode's time per step and peak memory, the cached
    features, and how far accumulation's peak lies above one micro-batch's (plain
    training at B = the micro-batch, when the sweep has it)."""
    by = {(r["mode"], r["global_batch"]): r for r in rows if r["status"] == "ok"}
    status = {(r["mode"], r["global_batch"]): r["status"] for r in rows}
    micro = next((r["micro_batch"] for r in rows if r["mode"] == "accumulate"), None)
    one = by.get(("plain", micro))
    lines = [
        f"| global batch | plain: ms/step | plain: peak MB | accumulate (micro-batch {micro}): "
        "ms/step | accumulate: peak MB | cached features MB | accumulate above one "
        "micro-batch: MB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for big in sorted({r["global_batch"] for r in rows}):
        cells = [str(big)]
        for mode in MODES:
            r = by.get((mode, big))
            cells += (
                [f"{r['median_ms']:.0f}", f"{r['peak_mb']:.0f}"] if r else [status[mode, big], ""]
            )
        acc = by.get(("accumulate", big))
        above = acc["peak_mb"] - one["peak_mb"] if acc and one else None
        cells.append(f"{acc['features_mb']:.1f}" if acc else "")
        cells.append(f"{round(above):d}" if above is not None else "")  # no "-0"
        lines.append("| " + " | ".join(cells) + " |")
    if one:
        lines.append(
            f"\nOne micro-batch ({micro} pairs) trained plainly peaks at {one['peak_mb']:.0f} MB."
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, mem_limit_mb: int | None) -> Path | None:
    """Peak memory and time per step against the global batch, log-log, one line per
    mode; the memory cap dashed, and where each mode ran out of memory marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    batches = sorted({r["global_batch"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in MODES:
        mine = sorted((r for r in ok if r["mode"] == mode), key=lambda r: r["global_batch"])
        label = mode if mode == "plain" else f"accumulate (micro-batch {mine[0]['micro_batch']})"
        for ax, key in zip(axes, ("peak_mb", "median_ms"), strict=True):
            if mine:
                xs = [r["global_batch"] for r in mine]
                ax.plot(xs, [max(r[key], 1e-3) for r in mine], marker="o", label=label)
        oom = [r["global_batch"] for r in rows if r["mode"] == mode and r["status"] == "oom"]
        if oom and mem_limit_mb:
            axes[0].plot(oom[:1], [mem_limit_mb], "x", ms=10, mew=2, color="red")
    if mem_limit_mb:
        axes[0].axhline(mem_limit_mb, ls="--", color="grey", label="memory cap (x: out of memory)")
    micro = next((r["micro_batch"] for r in ok if r["mode"] == "accumulate"), None)
    one = [r for r in ok if r["mode"] == "plain" and r["global_batch"] == micro]
    if one:
        label = f"one micro-batch (plain, B={micro})"
        axes[0].axhline(one[0]["peak_mb"], ls=":", color="grey", label=label)
    for ax, title in zip(
        axes, ("peak extra memory (MB)", "time per step (ms, median)"), strict=True
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("global batch")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, 0.92))
    fig.suptitle(f"demo towers, {rows[0]['device']}, torch {rows[0]['torch_version']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(rows: list[dict], out: Path, name: str, args, load: str) -> list[Path]:
    """Writes the CSV, the markdown table (with the run's settings and the machine's
    load average before and after) and the plot; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"{name}.csv", out / f"{name}.md"
    write_csv(rows, csv_path)
    cap = f"{args.mem_limit_mb} MB" if args.mem_limit_mb else "none"
    head = (
        f"{rows[0]['device']}, torch {rows[0]['torch_version']}, {rows[0]['timestamp']}; "
        f"extra-memory cap {cap}; {args.warmup} warm-up + {args.steps} timed steps per case; "
        f"load average (1, 5, 15 min) {load}"
    )
    table = markdown(rows)
    md_path.write_text(f"{head}\n\n{table}\n")
    print("\n" + table)
    png = plot(rows, out / f"{name}.png", args.mem_limit_mb)
    return [p for p in (csv_path, md_path, png) if p is not None]


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--global-batches", type=int, nargs="+", metavar="B")
    p.add_argument("--micro-batch", type=int, help="pairs per micro-batch of accumulate")
    p.add_argument(
        "--mem-limit-mb",
        type=int,
        help="cap on each case's extra address space (default 2048; 0: none)",
    )
    p.add_argument("--steps", type=int, help="timed steps per case (median reported)")
    p.add_argument("--warmup", type=int, help="untimed steps before them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's default)")
    p.add_argument("--case-timeout", type=float, default=1800, help="seconds per case")
    p.add_argument("--out", type=Path, default=Path("runs/accumulate"))
    p.add_argument("--name", help="file stem (default: accumulate-<device>)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one step (for tests)")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = dict(DEFAULTS, **(QUICK if args.quick else {}))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.mem_limit_mb = args.mem_limit_mb or None
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the sweep and writes its files; ``--case JSON`` runs one case (the worker)."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.case:
        return worker(args.case)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.name or "accumulate-" + _slug(device_name(torch.device("cpu")).split("(")[0])
    before = _load()
    print(f"demo towers on {device_name(torch.device('cpu'))}, load {before}")
    rows = sweep(args)
    load = f"{before} before, {_load()} after"
    files = write_report(rows, args.out, name, args, load)
    print(f"\nload {load}; wrote {', '.join(map(str, files))}")
    return 0


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", ("cpu " + text).lower()).strip("-")


if __name__ == "__main__":
    sys.exit(main())
