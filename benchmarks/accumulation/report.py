"""The rows of ``benchmarks/accumulate.py``: printed as each case finishes, and written as
``<name>.csv``, ``<name>.md`` (the table) and ``<name>.png`` (memory and time against the
global batch)."""

from __future__ import annotations

import csv
from pathlib import Path

from .workload import MODES

#: The CSV's columns, in order (a row per mode and global batch).
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
