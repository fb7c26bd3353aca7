"""Where the targets of a block of logits lie: the one place that says which pairs match.

The truths work on blocks of logits, the rows ``[i0, i1)`` of one side against every
column of the other. Each row's targets are the columns its softmax aims at (CLIP) or
that carry ``z = +1`` (SigLIP). Without labels every pair is its own and only positive,
so a block's targets are its part of the diagonal. Same-item labels (one id per pair,
equal ids the same item) give row ``i`` the set ``P(i)`` of the pairs with its label, its
own among them. Under ``same_label="positive"`` all of ``P(i)`` are targets, each of
weight ``1 / |P(i)|``; under ``"ignore"`` the diagonal stays the only target and the rest
of ``P(i)`` is *ignored*: those entries leave the row's softmax (CLIP) or the sum
(SigLIP). Equal labels are symmetric and pairs with equal labels share ``|P|``, so the
targets, their weights and the ignored entries are symmetric, and one
:func:`block_targets` serves the image rows and the text rows. Extra negative columns
(after the ``B`` texts) never hold a target and are never ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SAME_LABEL = ("positive", "ignore")


@dataclass(frozen=True)
class Targets:
    """The target entries of one block of rows: ``rows[k]`` (local to the block) aims at
    column ``cols[k]`` (global) with weight ``weight[k]``, in row order. ``weight`` is
    ``None`` where every row has one target (weight 1). ``ignored``: the entries that take
    no part, as ``(rows, cols)``; ``None`` where there are none."""

    rows: torch.Tensor
    cols: torch.Tensor
    weight: torch.Tensor | None = None
    ignored: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, cols)``, to index the block's logits with."""
        return self.rows, self.cols

    @property
    def weights(self) -> torch.Tensor | float:
        """Each entry's weight ``1 / |P|`` (1.0 where there is no ``weight``)."""
        return 1.0 if self.weight is None else self.weight

    @property
    def lone(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The entries that are their row's only target, as ``index``: a lone target's
        term is formed against it alone and its own temperature term is left out."""
        if self.weight is None:
            return self.index
        one = self.weight == 1.0
        return self.rows[one], self.cols[one]

    def mean(self, values: torch.Tensor, n_rows: int) -> torch.Tensor:
        """Each row's mean of ``values`` (one per entry) over its targets: their weighted
        sum (a lone target's value itself, exactly)."""
        out = torch.zeros(n_rows, dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.rows, values * self.weights)

    def without_ignored(self, block: torch.Tensor, fill: float) -> torch.Tensor:
        """``block`` with ``fill`` at the ignored entries (a copy; ``block`` itself when there
        are none): ``-inf`` takes a logit out of its softmax, ``0`` a term out of a sum."""
        if self.ignored is None:
            return block
        return block.index_put(
            self.ignored, torch.tensor(fill, dtype=block.dtype, device=block.device)
        )


def block_targets(
    i0: int,
    i1: int,
    device=None,
    labels: torch.Tensor | None = None,
    same_label: str = "positive",
) -> Targets:
    """The targets of rows ``[i0, i1)``: without ``labels`` each row ``i``'s own pair,
    column ``i``; with them (``[B]``, the global batch's) as the module docstring says,
    from the block's ``(i1 - i0) x B`` comparison of labels."""
    rows = torch.arange(i1 - i0, device=device)
    if labels is None:
        return Targets(rows, i0 + rows)
    same = labels[i0:i1, None] == labels[None, :]
    if same_label == "ignore":
        same[rows, i0 + rows] = False
        ignored = same.nonzero(as_tuple=True)
        return Targets(rows, i0 + rows, ignored=ignored if len(ignored[0]) else None)
    rows, cols = same.nonzero(as_tuple=True)
    weight = 1.0 / same.sum(1, dtype=torch.float64)
    return Targets(rows, cols, weight[rows])
