"""The report: a table per loss (or one JSON object), and the line that says what passed."""

from __future__ import annotations

import json
import textwrap

from .options import EXACT
from .rules import quantities

#: The tables, in order: each loss without targets, then with them (:mod:`.targets`).
TABLES = (
    ("clip", False, "CLIP (softmax)"),
    ("siglip", False, "SigLIP (sigmoid)"),
    ("clip", True, "CLIP (softmax), same-item labels and extra negatives"),
    ("siglip", True, "SigLIP (sigmoid), same-item labels and extra negatives"),
)

#: Under the table: what the columns are and how a row passes.
LEGEND = (
    "loss: each rank's returned value and loss_global (SigLIP: also loss_pos, loss_neg);\n"
    "d_image, d_text: each rank's feature gradients; d_scale, d_bias: the gradients of the\n"
    "temperature and the bias averaged over ranks, as DDP applies them. errors: the largest\n"
    "|ours - float64| / |float64| over all ranks; worst: the largest error / allowed, above 1\n"
    "fails; a NaN or an infinity anywhere fails its row (nan/inf, -). targets: positive and\n"
    "ignore: labels i % 3 under that same_label, and the extra negatives; negatives: those\n"
    "alone; d_neg: each rank's gradient of its negatives.\n"
)


def render(rows: list[dict], header: str) -> str:
    """The text report: ``header``, one table per loss (and per loss with targets), the
    legend, the count of passes."""
    lines = [header]
    for loss, targeted, title in TABLES:
        mine = [
            r for r in rows if r.get("loss", "clip") == loss and bool(r.get("targets")) == targeted
        ]
        if mine:
            lines += ["", title, *_table(mine, loss, targeted)]
    passed = sum(r["passed"] for r in rows)
    lines += ["", LEGEND + textwrap.fill(EXACT, 88), f"{passed} of {len(rows)} rows passed."]
    return "\n".join(lines)


def _table(rows: list[dict], loss: str, targeted: bool) -> list[str]:
    names = quantities(loss, "targets" if targeted else None)
    cols = ["backend", "precision", "scale", *(["bias"] if loss == "siglip" else [])]
    cols += [*(["targets"] if targeted else []), *names, "worst", "result"]
    table = [cols]
    for r in rows:
        cells = [r["backend"], r["precision"], f"{r['logit_scale']:.4g}"]
        if loss == "siglip":
            cells.append(f"{r['logit_bias']:+g}")
        if targeted:
            cells.append(r["targets"])
        cells += [_fmt(r["errors"][q]) for q in names]
        cells += ["-" if r["worst"] is None else f"{r['worst']:.2f}"]
        cells += ["PASS" if r["passed"] else "FAIL"]
        table.append(cells)
    widths = [max(len(row[k]) for row in table) for k in range(len(cols))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    ]


def to_json(
    ok: bool, world_size: int, where: str, sizes, opts, rows, error, negative_sizes=None
) -> str:
    """The ``--json`` report: one object (``negative_sizes``: the extra negatives' split,
    ``skipped``: what was not run, and why)."""
    report = {
        "ok": ok,
        "world_size": world_size,
        "where": where,
        "sizes": sizes,
        "negative_sizes": negative_sizes,
        "dim": opts.dim,
        "seed": opts.seed,
        "rows": rows or [],
        "error": error,
    }
    return json.dumps(report, indent=2)


def _fmt(x) -> str:
    return "nan/inf" if x is None else f"{x:.1e}"
