"""The bench's files: the CSV's columns, reading any layout it ever had, appending, the
default file stem, and whether a run may write where it was told to.

One row per case and run (:data:`FIELDS`). A CSV written before the quartile columns
existed (:data:`LEGACY_FIELDS`) reads as it is, the missing cells empty; the first row
appended to it rewrites its header (atomically: a new file moved over the old one), every
old row kept with empty quartile cells. A file with any other header is refused before
any case runs (:func:`output_problem`).
"""

from __future__ import annotations

import csv
import os
import platform
import re
import tempfile
from pathlib import Path

import torch

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
    "q1_ms",
    "q3_ms",
    "spread",
    "peak_mb",
    "loss",
    "loss_diff",
    "grad_diff",
    "status",
    "note",
)
#: The columns of every CSV written before the timed runs' quartiles were recorded.
LEGACY_FIELDS = tuple(k for k in FIELDS if k not in ("q1_ms", "q3_ms", "spread"))
#: The values of the ``status`` column.
STATUSES = ("ok", "oom", "skip", "error", "timeout")
#: What the files of one run are called: ``<out>/<name><suffix>``.
SUFFIXES = (".csv", ".md", ".png")


def csv_rows(path: Path) -> list[dict]:
    """Every row of the CSV at ``path`` (none if it does not exist); cells of columns the
    file's layout lacks read as ``""``."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: row.get(k) or "" for k in FIELDS} for row in csv.DictReader(f)]


def header(path: Path) -> tuple[str, ...]:
    """The CSV's column names (empty for an empty file)."""
    with path.open(newline="") as f:
        return tuple(next(csv.reader(f), []))


def append_row(path: Path, row: dict) -> None:
    """Appends ``row``, writing the header first if the file is new and upgrading a
    :data:`LEGACY_FIELDS` header first (module docstring).

    Raises SystemExit when the file has other columns: appending would misalign them.
    """
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        columns = header(path)
        if columns == LEGACY_FIELDS:
            _upgrade(path)
        elif columns != FIELDS:
            raise SystemExit(
                f"{path} has other columns ({list(columns)}); pick another --name or move it"
            )
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: _fmt(row.get(k)) for k in FIELDS})


def _upgrade(path: Path) -> None:
    rows = csv_rows(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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


def output_problem(out: Path, name: str, plot_only: bool) -> str | None:
    """Why the run's files ``<out>/<name>.{csv,md,png}`` cannot be written (``None`` if
    they can), found before any case runs; ``--plot-only`` also needs the CSV's rows.

    Creates ``out`` (with its parents) when it does not exist and a run will write there.
    """
    paths = [out / f"{name}{suffix}" for suffix in SUFFIXES]
    if plot_only:
        if not paths[0].is_file():
            return f"--plot-only: no CSV to redraw at {paths[0]}"
    elif out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder"
    else:
        try:
            out.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=out).close()
        except OSError as exc:
            return f"--out {out}: cannot write there ({exc.strerror or exc})"
    for path in paths:
        if path.is_dir():
            return f"{path} is a folder: pick another --name"
        if path.exists() and not os.access(path, os.W_OK):
            return f"{path} is not writable: pick another --name"
    if paths[0].is_file() and paths[0].stat().st_size > 0:
        try:
            columns = header(paths[0])
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            return f"{paths[0]} is not a readable CSV ({exc}): pick another --name"
        if columns not in (FIELDS, LEGACY_FIELDS):
            return f"{paths[0]} is not a palmtree bench CSV (other columns): pick another --name"
    if plot_only and not csv_rows(paths[0]):
        return f"--plot-only: {paths[0]} has no rows"
    return None


def default_name(device: torch.device, loss: str = "clip") -> str:
    """The default file stem: the device's slug (``cpu-amd-epyc``), ``-siglip`` appended
    for the sigmoid loss, so that each file's table and plot hold one loss."""
    name = _slug(f"{device.type} {device_name(device).split('(')[0]}")
    return name if loss == "clip" else f"{name}-{loss}"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "CPU"
    return f"{model} ({torch.get_num_threads()} threads)"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
