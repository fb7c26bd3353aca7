"""Where the targets of a block of logits lie: the one place that says "the diagonal".

The truths work on blocks of logits, the rows ``[i0, i1)`` of one side against every
column of the other. Each row's targets are the columns its softmax aims at (CLIP) or
that carry ``z = +1`` (SigLIP). Today every pair is its own and only positive, so a
block's targets are its part of the diagonal. Same-item labels would give a row every
column with its label, each of weight ``1 / n_i``; as pairs with equal labels share
``n_i``, those targets are symmetric and one :func:`block_targets` still serves the image rows
and the text rows. Extra negative columns would never hold a target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Targets:
    """The target entries of one block of rows: ``rows[k]`` (local to the block) aims at
    column ``cols[k]`` (global). Today one entry per row, in row order."""

    rows: torch.Tensor
    cols: torch.Tensor

    @property
    def index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, cols)``, to index the block's logits with."""
        return self.rows, self.cols


def block_targets(i0: int, i1: int, device=None) -> Targets:
    """The targets of rows ``[i0, i1)``: each row ``i``'s own pair, column ``i``."""
    rows = torch.arange(i1 - i0, device=device)
    return Targets(rows, i0 + rows)
