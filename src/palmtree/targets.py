"""Global targets: same-item labels and extra negative columns (docs/design.md §10).

``labels`` give each pair an item id; pairs anywhere in the global batch with equal ids
are the same item. ``same_label="positive"`` makes them each other's positives (CLIP:
each row's target is uniform over its item's columns; SigLIP: ``z = +1``);
``"ignore"`` keeps the diagonal the only positive and takes the other same-item pairs
out of the loss. ``text_negatives`` are extra text columns that every image row sees and
that are never a target.

Labels travel as ``[B]`` ids (one all-gather of ``b`` integers per rank); the backends
compare them per chunk or tile, so no ``B x B`` mask exists outside the ``reference``
backend, which materialises the logits anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .collectives import gather_rows
from .distributed import Layout

#: The ``same_label`` option's values.
SAME_LABEL = ("positive", "ignore")


@dataclass(frozen=True)
class Targets:
    """What the backends need to know about a call's targets.

    ``labels``: ``[B]`` int64, every global pair's id in rank order. ``ignore``: same-item
    pairs off the diagonal leave the sums (``True``) or are positives (``False``).
    ``counts``: ``[B]`` fp32, how many pairs of the global batch share each pair's id
    (``|P(k)|``, the pair itself included). ``n_pairs`` is ``B``: columns from ``B`` on
    are extra negatives, never a target and never a query. ``columns``: one small id
    per column, equal where the labels are (each pair's first place among the sorted
    ids, int32), ``-1`` for the extra negatives, so that one comparison of ids says it
    all (in 32-bit registers in the fused kernels).
    """

    labels: torch.Tensor
    ignore: bool
    counts: torch.Tensor
    n_pairs: int
    columns: torch.Tensor
    #: One per column: every global pair's similarity ``<u_k, v_k>`` (0 at the extra
    #: negatives' columns), which the kernels measure same-item positives against (set
    #: by the CLIP pass before its kernels run).
    pair_dot: torch.Tensor | None = None

    def rows(self, offset: int, b: int) -> torch.Tensor:
        """The :attr:`columns` ids of the pairs ``[offset, offset + b)``, as rows."""
        return self.columns[offset : offset + b]

    def same(self, row_ids: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
        """``[len(row_ids), c1 - c0]``: whether the rows (their :meth:`rows` ids) and
        columns ``[c0, c1)`` are the same item (never for the extra negatives' columns)."""
        return row_ids[:, None] == self.columns[None, c0:c1]


def global_targets(labels, layout: Layout, same_label: str) -> Targets | None:
    """This call's :class:`Targets` from every rank's ``labels`` (``None`` when no rank
    passed any: every pair is its own item and the diagonal is every target)."""
    if labels is None:
        return None
    labels = gather_rows(labels.to(torch.int64), layout)
    # |P(k)| from the sorted ids, in static shapes (``torch.compile`` traces it whole).
    ordered = torch.sort(labels).values
    counts = torch.searchsorted(ordered, labels, right=True) - torch.searchsorted(ordered, labels)
    first = torch.searchsorted(ordered, labels, out_int32=True)  # equal ids, equal places
    columns = torch.cat([first, first.new_full((sum(layout.negative_sizes),), -1)])
    ignore, B = same_label == "ignore", layout.b_global
    return Targets(labels, ignore, counts.to(torch.float32), B, columns)


def labels_problem(labels, b: int, device: torch.device) -> str | None:
    """Why ``labels`` are no labels of ``b`` pairs on ``device`` (``None`` if they are)."""
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        return f"labels must be an integer tensor [b], got {type(labels).__name__}"
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        return f"labels must be an integer tensor (one id per pair), got {labels.dtype}"
    if labels.dim() != 1 or labels.shape[0] != b:
        return f"labels must have shape [{b}] (one id per pair), got {tuple(labels.shape)}"
    if labels.device != device:
        return f"labels are on {labels.device} but the features are on {device}"
    return None


def negatives_problem(negatives, dim: int, device: torch.device, dtypes) -> str | None:
    """Why ``negatives`` are no ``[n, dim]`` extra text columns (``None`` if they are)."""
    if negatives is None:
        return None
    if not isinstance(negatives, torch.Tensor):
        return f"text_negatives must be a tensor [n, D], got {type(negatives).__name__}"
    if negatives.dtype not in dtypes:
        return f"text_negatives must be a floating-point tensor, got {negatives.dtype}"
    if negatives.dim() != 2 or negatives.shape[1] != dim:
        return (
            f"text_negatives must have shape [n, {dim}] (the features' width), got "
            f"{tuple(negatives.shape)}"
        )
    if negatives.device != device:
        return f"text_negatives are on {negatives.device} but the features are on {device}"
    return None
