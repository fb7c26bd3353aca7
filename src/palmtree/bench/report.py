"""What ``palmtree bench`` draws from its CSV: the markdown table, the plot, the ratios.

Each run appends one row per case to ``<out>/<name>.csv`` as the case ends
(:mod:`~palmtree.bench.csvfile`), then redraws ``<out>/<name>.md`` (the table, and
chunked's memory and time against the reference) and ``<out>/<name>.png`` (log-log time
and memory against ``B``) from the rows of the latest run. Everything here reads the
CSV's text rows, so a table or plot can be redrawn from any CSV this bench ever wrote
(``--plot-only``, ``benchmarks/gpu_check.sh``).

Every time comes with its spread, the interquartile range of the timed runs relative to
the median (:func:`palmtree.bench.measure.timing`); a time ratio whose two cases' IQRs
overlap is marked not meaningful (:data:`RATIO_RULE`).
"""

from __future__ import annotations

from pathlib import Path

from ..backends import BACKENDS
from . import compiled
from .cases import impl_label, split_label
from .check import OUTSIDE
from .csvfile import csv_rows, latest_run
from .targets import split_tag

#: How a time ratio is judged, said under the ratios in the ``.md`` file.
RATIO_RULE = (
    "A time ratio's range runs from its case's first quartile over the baseline's third "
    "to its third quartile over the baseline's first: it holds 1 exactly when the two "
    "cases' interquartile ranges overlap, and the ratio is then not meaningful (the "
    "difference is within the noise of the timed runs)."
)


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
        _draw(axes[0], series, "median_ms", label, spread=True)
        _draw(axes[1], series, "peak_mb", label, spread=False)
    dims = sorted({r["dim"] for r in ok}, key=int)
    batches = sorted({int(r["batch"]) for r in ok})
    for ax, title in zip(
        axes,
        ("forward+backward time (ms: median, bars from Q1 to Q3)", "peak extra memory (MB)"),
        strict=True,
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


def _draw(ax, series: list[dict], key: str, label: str, spread: bool) -> None:
    """One line of ``key`` against ``B``; with ``spread``, bars from the first to the third
    quartile where every point has them."""
    pts = [(int(r["batch"]), _num(r[key]), r) for r in series]
    pts = [(x, y, r) for x, y, r in pts if y is not None and y > 0]
    if not pts:
        return
    x, y, rows = zip(*pts, strict=True)
    q = [(_num(r.get("q1_ms")), _num(r.get("q3_ms"))) for r in rows]
    if not spread or any(None in pair for pair in q):
        ax.plot(x, y, marker="o", label=label)
        return
    low = [m - q1 for m, (q1, _) in zip(y, q, strict=True)]
    high = [q3 - m for m, (_, q3) in zip(y, q, strict=True)]
    ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, label=label)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table, grouped by implementation and precision.

    ``IQR`` is the spread of the timed runs relative to the median (empty for one run,
    or a CSV from before it was recorded). The status cell carries the note of a row that
    is not ``ok``, and of an ``ok`` row the parts that say its loss or temperature
    gradient fell outside the float64 bounds and how long it took to compile.
    """
    columns = ["impl", "precision", "B", "D", "median (ms)", "IQR", "min (ms)", "peak (MB)"]
    columns += ["loss", "loss diff", "grad diff", "status"]
    align = ["---"] * 2 + ["---:"] * (len(columns) - 3) + ["---"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    order: dict[tuple[str, str], int] = {}
    for r in rows:
        order.setdefault((r["impl"], r["precision"]), len(order))

    def key(r):
        return order[r["impl"], r["precision"]], int(r["dim"]), int(r["batch"])

    for r in sorted(rows, key=key):
        cells = [r["impl"], r["precision"], r["batch"], r["dim"], _short(r["median_ms"])]
        spread = _num(r.get("spread"))
        cells.append("" if spread is None else percent(spread))
        keys = ("min_ms", "peak_mb", "loss", "loss_diff", "grad_diff")
        cells += [_short(r[k]) for k in keys]
        lines.append("| " + " | ".join(cells + [_status(r)]) + " |")
    return "\n".join(lines)


def _status(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']}: {r['note']}"
    shown = [p for p in r["note"].split("; ") if p.startswith((OUTSIDE, compiled.NOTE_START))]
    return "; ".join(["ok", *shown])


def _short(text: str) -> str:
    x = _num(text)
    if x is None:
        return ""
    if x == 0:
        return "0"
    if abs(x) < 1e-2:
        return f"{x:.1e}"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def percent(fraction: float) -> str:
    """A relative spread as a percentage with two significant digits (``4.2%``, ``13%``)."""
    x = 100 * fraction
    return f"{x:.0f}%" if x >= 10 else f"{x:.2g}%"


#: What each single-pass backend is compared with, when it ran: the reference backend
#: (the memory target is relative to it) and open_clip, the peer most runs use.
BASELINES = ("reference", "open_clip")
#: The baselines of ``chunked+compile``: chunked in eager mode first (does compiling help?).
COMPILED_BASELINES = ("chunked", *BASELINES)


def target_summary(rows: list[dict]) -> list[str]:
    """chunked (and fused) against each of :data:`BASELINES`, and chunked+compile against
    :data:`COMPILED_BASELINES` (same loss, targets, precision, B and D), wherever both
    ran: memory and time ratios."""
    ok = {(r["impl"], r["precision"], r["batch"], r["dim"]): r for r in rows if r["status"] == "ok"}
    lines = []
    for (label, prec, b, d), r in sorted(ok.items(), key=lambda kv: (kv[0][1], int(kv[0][2]))):
        head, tag = split_tag(label)
        loss, impl = split_label(head)
        if impl not in (*BACKENDS, compiled.COMPILED) or impl == "reference":
            continue
        for base in COMPILED_BASELINES if impl == compiled.COMPILED else BASELINES:
            name = impl_label(base, loss) + tag
            other = ok.get((name, prec, b, d))
            if other is not None:
                lines.append(f"{label} / {name} ({prec}, B={b}, D={d}): " + _ratios(r, other))
    return lines


def _ratios(r: dict, base: dict) -> str:
    # A peak below the RSS granularity reads 0: no "1/x" then, and no ratio over it.
    if _num(base["peak_mb"]) <= 0:
        return f"memory: the baseline's peak reads 0, {time_ratio(r, base)}"
    mem = _num(r["peak_mb"]) / _num(base["peak_mb"])
    inverse = f" (1/{1 / mem:.1f})" if mem > 0 else ""
    return f"memory {mem:.3f}x{inverse}, {time_ratio(r, base)}"


def time_ratio(r: dict, base: dict) -> str:
    """``r``'s median time over ``base``'s, with its range and verdict (:data:`RATIO_RULE`);
    ``spread unknown`` when a row has no quartiles."""
    text = f"time {_num(r['median_ms']) / _num(base['median_ms']):.2f}x"
    q1, q3, b1, b3 = (_num(x.get(k)) for x in (r, base) for k in ("q1_ms", "q3_ms"))
    if None in (q1, q3, b1, b3):
        return text + " (spread unknown)"
    low, high = q1 / b3, q3 / max(b1, 1e-12)
    text += f" ({low:.2f} to {high:.2f})"
    return text + (", not meaningful: the IQRs overlap" if low <= 1 <= high else "")


def write_report(csv_path: Path, no_plot: bool) -> None:
    """Redraws the table (``.md``) and the plot (``.png``) from the CSV's latest run.

    Raises what writing them raises (``OSError``, a plotting error); the CSV is only read.
    """
    rows = latest_run(csv_rows(csv_path))
    if not rows:
        print(f"no rows in {csv_path}")
        return
    table = markdown_table(rows)
    ratios = target_summary(rows)
    print("\n" + table)
    for line in ratios:
        print(line)
    md = csv_path.with_suffix(".md")
    text = f"{rows[0]['device']}, torch {rows[0]['torch_version']}, {rows[0]['timestamp']}\n\n"
    text += table + "\n" + "".join(f"\n- {line}" for line in ratios)
    md.write_text(text + "\n" + (f"\n{RATIO_RULE}\n" if ratios else ""))
    png = None if no_plot else plot(rows, csv_path.with_suffix(".png"))
    print(f"\nwrote {csv_path}, {md}" + (f", {png}" if png else ""))
