"""What ``palmtree bench`` writes: CSV rows, the markdown table, the plot, the ratios.

Each run appends one row per case to ``<out>/<name>.csv`` (the columns are
:data:`FIELDS`), then redraws ``<out>/<name>.md`` (the table and chunked's memory and
time against the reference) and ``<out>/<name>.png`` (log-log time and memory against
``B``) from the rows of the latest run. Everything here reads the CSV's text rows, so a
table or plot can be redrawn from any CSV (``--plot-only``, ``benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..backends import BACKENDS
from .cases import impl_label, split_label
from .check import OUTSIDE

FIELDS = (
    "timestamp",
    "device",
    "torch_version",
    "palmtree_version",
    "impl",
    "impl_version",
    "precision",
    "batch",
    "dim",
    "repeats",
    "median_ms",
    "min_ms",
    "peak_mb",
    "loss",
    "loss_diff",
    "grad_diff",
    "status",
    "note",
)
#: The values of the ``status`` column.
STATUSES = ("ok", "oom", "skip", "error", "timeout")


def csv_rows(path: Path) -> list[dict]:
    """Every row of the CSV at ``path`` (none if it does not exist)."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict) -> None:
    """Appends ``row``, writing the header first if the file is new.

    Raises SystemExit when the file has other columns (an older layout): appending would
    misalign them.
    """
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != FIELDS:
            raise SystemExit(
                f"{path} has other columns ({header}); pick another --name or move the file"
            )
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: _fmt(row.get(k)) for k in FIELDS})


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 and value != 0 else f"{value:.6g}"
    return str(value)


def latest_run(rows: list[dict]) -> list[dict]:
    """The rows written by the most recent run (they share one timestamp)."""
    if not rows:
        return []
    last = max(r["timestamp"] for r in rows)
    return [r for r in rows if r["timestamp"] == last]


def _num(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _series(rows: list[dict]) -> dict[str, list[dict]]:
    dims = {r["dim"] for r in rows}
    out: dict[str, list[dict]] = {}
    for r in rows:
        label = f"{r['impl']} {r['precision']}" + (f" D={r['dim']}" if len(dims) > 1 else "")
        out.setdefault(label, []).append(r)
    return out


def plot(rows: list[dict], path: Path) -> Path | None:
    """Log-log time and peak memory against the batch size; one line per impl/precision.

    Returns ``path``, or ``None`` (nothing drawn) when no row is ``ok``.
    """
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, series in _series(ok).items():
        series = sorted(series, key=lambda r: int(r["batch"]))
        b = [int(r["batch"]) for r in series]
        for ax, key in zip(axes, ("median_ms", "peak_mb"), strict=True):
            pts = [(x, _num(r[key])) for x, r in zip(b, series, strict=True)]
            pts = [(x, y) for x, y in pts if y is not None and y > 0]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    dims = sorted({r["dim"] for r in ok}, key=int)
    batches = sorted({int(r["batch"]) for r in ok})
    for ax, title in zip(
        axes, ("forward+backward time (ms, median)", "peak extra memory (MB)"), strict=True
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("global batch size B")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{rows[0]['device']}, D={'/'.join(dims)}, torch {rows[0]['torch_version']}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table, grouped by implementation and precision.

    The status cell carries the note of a row that is not ``ok``, and of an ``ok`` row
    whose loss or temperature gradient fell outside the float64 bounds.
    """
    columns = ["impl", "precision", "B", "D", "median (ms)", "min (ms)", "peak (MB)", "loss"]
    columns += ["loss diff", "grad diff", "status"]
    align = ["---"] * 2 + ["---:"] * (len(columns) - 3) + ["---"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    order: dict[tuple[str, str], int] = {}
    for r in rows:
        order.setdefault((r["impl"], r["precision"]), len(order))

    def key(r):
        return order[r["impl"], r["precision"]], int(r["dim"]), int(r["batch"])

    for r in sorted(rows, key=key):
        cells = [r["impl"], r["precision"], r["batch"], r["dim"]]
        keys = ("median_ms", "min_ms", "peak_mb", "loss", "loss_diff", "grad_diff")
        cells += [_short(r[k]) for k in keys]
        lines.append("| " + " | ".join(cells + [_status(r)]) + " |")
    return "\n".join(lines)


def _status(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']}: {r['note']}"
    outside = [part for part in r["note"].split("; ") if part.startswith(OUTSIDE)]
    return "; ".join(["ok", *outside])


def _short(text: str) -> str:
    x = _num(text)
    if x is None:
        return ""
    if x == 0:
        return "0"
    if abs(x) < 1e-2:
        return f"{x:.1e}"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


#: What each single-pass backend is compared with, when it ran: the reference backend
#: (the memory target is relative to it) and open_clip, the peer most runs use.
BASELINES = ("reference", "open_clip")


def target_summary(rows: list[dict]) -> list[str]:
    """chunked (and fused) against each of :data:`BASELINES` (same loss, precision, B
    and D) wherever both ran: memory and time ratios."""
    ok = {(r["impl"], r["precision"], r["batch"], r["dim"]): r for r in rows if r["status"] == "ok"}
    lines = []
    for (label, prec, b, d), r in sorted(ok.items(), key=lambda kv: (kv[0][1], int(kv[0][2]))):
        loss, impl = split_label(label)
        if impl not in BACKENDS or impl == "reference":
            continue
        for base in BASELINES:
            other = ok.get((impl_label(base, loss), prec, b, d))
            if other is not None:
                lines.append(f"{label} / {impl_label(base, loss)} ({prec}, B={b}, D={d}): ")
                lines[-1] += _ratios(r, other)
    return lines


def _ratios(r: dict, base: dict) -> str:
    mem = _num(r["peak_mb"]) / max(_num(base["peak_mb"]), 1e-9)
    tim = _num(r["median_ms"]) / _num(base["median_ms"])
    # A peak below the RSS granularity reads 0: no "1/x" then.
    inverse = f" (1/{1 / mem:.1f})" if mem > 0 else ""
    return f"memory {mem:.3f}x{inverse}, time {tim:.2f}x"


def write_report(csv_path: Path, no_plot: bool) -> None:
    """Redraws the table (``.md``) and the plot (``.png``) from the CSV's latest run."""
    rows = latest_run(csv_rows(csv_path))
    if not rows:
        print(f"no rows in {csv_path}")
        return
    table = markdown_table(rows)
    ratios = target_summary(rows)
    md = csv_path.with_suffix(".md")
    text = f"{rows[0]['device']}, torch {rows[0]['torch_version']}, {rows[0]['timestamp']}\n\n"
    md.write_text(text + table + "\n" + "".join(f"\n- {line}" for line in ratios) + "\n")
    print("\n" + table)
    for line in ratios:
        print(line)
    if not no_plot:
        png = plot(rows, csv_path.with_suffix(".png"))
        print(f"\nwrote {csv_path}, {md}" + (f", {png}" if png else ""))
    else:
        print(f"\nwrote {csv_path}, {md}")
