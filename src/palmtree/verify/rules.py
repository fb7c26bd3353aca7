"""How a row passes: ``palmtree.testing``'s rules, applied to what the ranks computed.

Each quantity of a row is one or more comparisons of a result with its float64 truth
(docs/design.md §8, "What exact means"):

* sums (each rank's loss, ``loss_global``, SigLIP's ``loss_pos`` and ``loss_neg``, the
  temperature's and the bias's gradients) pass when ``|ours - float64| <= bound``, the
  bound that :func:`palmtree.testing.clip_truth` derives from the computation itself
  (the rule of :func:`palmtree.testing.check_scalar`): relative to the value, with no
  absolute allowance, so a small loss must keep its digits;
* gradient tensors (each rank's feature gradients, and its extra negatives' in the rows
  with global targets) pass when ``max |ours - float64|`` is at most
  :func:`palmtree.testing.tensor_bound`: twice the error of a plain fp32 computation with
  the same operand rounding, plus ``1e-6`` of the largest entry (the rule of
  :func:`palmtree.testing.check_tensor`); where the truth is exactly 0, as at ``D = 1``
  where the normalisation's projection removes it all, of the largest entry before
  that projection.

A NaN or an infinity anywhere (in our result on any rank, in the truth, in a bound)
fails the comparison: every figure that is not finite becomes ``inf`` before it is
compared or reduced over ranks, since a NaN compares false both ways and ``max`` may
skip it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: What each row of a loss compares, in the table's order.
QUANTITIES = {
    "clip": ("loss", "d_image", "d_text", "d_scale"),
    "siglip": ("loss", "d_image", "d_text", "d_scale", "d_bias"),
}


def quantities(loss: str, targets: str | None = None) -> tuple[str, ...]:
    """What a row compares: :data:`QUANTITIES`, and ``d_neg`` (each rank's gradient of its
    extra negatives) after ``d_text`` in the rows with global targets."""
    q = QUANTITIES[loss]
    return q if targets is None else (*q[:3], "d_neg", *q[3:])


@dataclass
class Comparison:
    """One result against its float64 truth: ``error = |ours - truth|`` (the largest
    entry's for a tensor), the ``bound`` it must stay within, and ``size = |truth|``."""

    quantity: str
    error: float
    bound: float
    size: float

    def figures(self) -> tuple[float, float, float]:
        """``(error / bound, relative error, relative bound)``, ``inf`` where not finite.

        Relative to ``size``, or absolute where the truth is 0 (an empty rank's loss, the
        temperature's gradient above the cap).
        """
        err, bound, size = (_finite_or_inf(x) for x in (self.error, self.bound, self.size))
        if math.inf in (err, bound, size):  # an infinite bound or truth lets anything pass
            return math.inf, _finite_or_inf(err / size if size else err), math.inf
        ratio = err / bound if bound > 0 else (0.0 if err == 0 else math.inf)
        return ratio, err / size if size else err, bound / size if size else bound


def figures_by_quantity(comparisons: list[Comparison], quantities) -> list[float]:
    """For each quantity, the largest ``(ratio, relative error, relative bound)`` over its
    comparisons, flattened: what the ranks reduce with MAX (``inf`` where none)."""
    out = []
    for q in quantities:
        mine = [c.figures() for c in comparisons if c.quantity == q]
        out += [max((f[k] for f in mine), default=math.inf) for k in range(3)]
    return out


@dataclass
class Row:
    """One row of the report: a loss, backend, precision and temperature (and bias), and
    its global targets (``None``: none; :mod:`.targets`)."""

    backend: str
    precision: str
    logit_scale: float
    loss: str = "clip"
    logit_bias: float | None = None
    targets: str | None = None
    errors: dict[str, float | None] = field(default_factory=dict)
    tolerances: dict[str, float | None] = field(default_factory=dict)
    worst: float | None = None
    passed: bool = False


def judge(row: Row, figures: list[float]) -> Row:
    """Fills ``row`` from :func:`figures_by_quantity`'s list (reduced over ranks).

    ``errors`` and ``tolerances`` are relative (``null`` in JSON where not finite);
    ``worst`` is the largest error / bound; the row passes when it is at most 1.
    """
    names = quantities(row.loss, row.targets)
    if len(figures) != 3 * len(names):
        raise ValueError(f"expected {3 * len(names)} figures, got {len(figures)}")
    ratios = []
    for k, q in enumerate(names):
        ratio, rel_err, rel_bound = (_finite_or_inf(x) for x in figures[3 * k : 3 * k + 3])
        ratios.append(ratio)
        row.errors[q] = _none_if_not_finite(rel_err)
        row.tolerances[q] = _none_if_not_finite(rel_bound)
    row.worst = _none_if_not_finite(max(ratios))
    row.passed = row.worst is not None and row.worst <= 1.0
    return row


def _finite_or_inf(value: float) -> float:
    """NaN (and -inf) become ``inf``: every comparison must fail on them."""
    value = float(value)
    return value if math.isfinite(value) else math.inf


def _none_if_not_finite(value: float) -> float | None:
    """JSON has no NaN or inf: a non-finite figure is reported as ``null`` (a failure)."""
    return value if math.isfinite(value) else None
