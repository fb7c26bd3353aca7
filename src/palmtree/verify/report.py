"""The report: a table per loss (or one JSON object), and the line that says what passed."""

from __future__ import annotations

import json
import textwrap

from .options import EXACT
from .rules import QUANTITIES

#: Under the table: what the columns are and how a row passes.
LEGEND = (
    "loss: each rank's returned value and loss_global (SigLIP: also loss_pos, loss_neg);\n"
    "d_image, d_text: each rank's feature gradients; d_scale, d_bias: the gradients of the\n"
    "temperature and the bias averaged over ranks, as DDP applies them. errors: the largest\n"
    "|ours - float64| / |float64| over all ranks; worst: the largest error / allowed, above 1\n"
    "fails; a NaN or an infinity anywhere fails its row (nan/inf, -).\n"
)


def render(rows: list[dict], header: str) -> str:
    """The text report: ``header``, one table per loss, the legend, the count of passes."""
    lines = [header]
    for loss, title in (("clip", "CLIP (softmax)"), ("siglip", "SigLIP (sigmoid)")):
        mine = [r for r in rows if r.get("loss", "clip") == loss]
        if mine:
            lines += ["", title, *_table(mine, loss)]
    passed = sum(r["passed"] for r in rows)
    lines += ["", LEGEND + textwrap.fill(EXACT, 88), f"{passed} of {len(rows)} rows passed."]
    return "\n".join(lines)


def _table(rows: list[dict], loss: str) -> list[str]:
    quantities = QUANTITIES[loss]
    cols = ["backend", "precision", "scale", *(["bias"] if loss == "siglip" else [])]
    cols += [*quantities, "worst", "result"]
    table = [cols]
    for r in rows:
        cells = [r["backend"], r["precision"], f"{r['logit_scale']:.4g}"]
        if loss == "siglip":
            cells.append(f"{r['logit_bias']:+g}")
        cells += [_fmt(r["errors"][q]) for q in quantities]
        cells += ["-" if r["worst"] is None else f"{r['worst']:.2f}"]
        cells += ["PASS" if r["passed"] else "FAIL"]
        table.append(cells)
    widths = [max(len(row[k]) for row in table) for k in range(len(cols))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    ]


def to_json(ok: bool, world_size: int, where: str, sizes, opts, rows, error) -> str:
    """The ``--json`` report: one object."""
    report = {
        "ok": ok,
        "world_size": world_size,
        "where": where,
        "sizes": sizes,
        "dim": opts.dim,
        "seed": opts.seed,
        "rows": rows or [],
        "error": error,
    }
    return json.dumps(report, indent=2)


def _fmt(x) -> str:
    return "nan/inf" if x is None else f"{x:.1e}"
