"""The bench's global targets: same-item labels (``--labels``) and extra negative text
columns (``--negatives``), how a row names them, and who cannot take them.

With ``--labels K`` pair ``i``'s item id is ``i % K``: each item has about ``B / K``
pairs, spread over the batch, and ``--same-label`` says how they count
(:func:`palmtree.clip_loss`'s ``same_label``). With ``--negatives R`` every case gets
``round(R * B)`` extra text columns, the texts of ``testing.make_pairs`` drawn from
:data:`NEGATIVES_SEED` past the run's seed (a seed no ``--seed`` can name), fp32 on the
device. Every case of one run has the same targets.

A row says which it had in its ``impl`` cell, as it says the loss (``siglip:``): a
suffix ``[labels=K]``, ``[labels=K same=ignore]``, ``[negatives=RxB]`` or both in one
bracket (``chunked[labels=10 negatives=1xB]``). The CSV's columns stay those of every
file written before, rows without targets read as they always did, and rows with and
without them never share a table line, a plot line or a ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import peers

#: Added to the run's seed for the negatives' draw: above every ``--seed`` (< 2**63), so
#: the negatives are never the texts of any run's pairs.
NEGATIVES_SEED = 2**63


@dataclass(frozen=True)
class TargetSpec:
    """A run's targets: ``labels`` ``K`` (0: none, every pair its own item), how pairs of
    one item count (``same_label``), and ``negatives`` ``R`` (0: none) per pair."""

    labels: int = 0
    same_label: str = "positive"
    negatives: float = 0.0

    @property
    def on(self) -> bool:
        return bool(self.labels or self.negatives)

    def n_negatives(self, batch: int) -> int:
        """How many extra negatives a batch of ``batch`` pairs gets: ``round(R * B)``."""
        return round(self.negatives * batch)

    def tag(self) -> str:
        """The ``impl`` cell's suffix: ``""`` without targets (module docstring)."""
        parts = []
        if self.labels:
            parts.append(f"labels={self.labels}")
            if self.same_label != "positive":
                parts.append(f"same={self.same_label}")
        if self.negatives:
            parts.append(f"negatives={self.negatives:.12g}xB")
        return f"[{' '.join(parts)}]" if parts else ""

    def describe(self) -> str:
        """One phrase for the console's first line (``""`` without targets)."""
        parts = []
        if self.labels:
            parts.append(f"labels i % {self.labels} ({self.same_label})")
        if self.negatives:
            parts.append(f"round({self.negatives:.12g} * B) extra negatives")
        return ", ".join(parts)


#: No labels and no extra negatives: every case before ``--labels`` and ``--negatives``.
NO_TARGETS = TargetSpec()


def split_tag(label: str) -> tuple[str, str]:
    """``(label without its targets, the targets' suffix)`` of an ``impl`` cell:
    ``("siglip:chunked", "[labels=3]")``; ``(label, "")`` for a row without targets."""
    head, sep, rest = label.partition("[")
    return (head, sep + rest) if sep and rest.endswith("]") else (label, "")


def skip_reason(impl: str, spec: TargetSpec) -> str | None:
    """Why ``impl`` cannot take the run's targets (``None`` if it can): the peers take
    neither labels nor extra negatives; every palmtree backend takes both."""
    if not spec.on:
        return None
    flags = [f for f, on in (("--labels", spec.labels), ("--negatives", spec.negatives)) if on]
    if impl in peers.PEERS:
        return f"{impl} takes neither same-item labels nor extra negatives ({' '.join(flags)})"
    return None
