"""The rows with global targets: same-item labels and extra text negatives (docs/design.md §10).

Each loss gets three more rows per backend and precision, at the largest temperature
(SigLIP: with bias -10), on the same batch and split as the other rows:

* ``positive``: the labels ``i % 3`` over the global batch (three items, each spread over
  every rank) under ``same_label="positive"``, and the extra negatives;
* ``ignore``: the same labels under ``same_label="ignore"``, and the negatives;
* ``negatives``: the negatives alone, no labels.

Every backend runs all three (``fused`` compares the ids in its kernels' tiles).

The negatives are hard ones: each is the text of a pair of the batch with as much noise
again, so its similarity to that pair's image is close to the positive's. There are
``B // 4`` of them (at least one), split unevenly: rank ``r`` holds a share proportional
to ``r + 1``, and rank 0 holds none when there are two or more ranks (with three or more,
rank 1 holds no pairs but some negatives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .options import Options

#: How many items the labels name: pair ``i`` is item ``i % ITEMS``.
ITEMS = 3
#: Labels rows: which ``same_label`` each runs under.
SAME_LABEL = {"positive": "positive", "ignore": "ignore", "negatives": None}


def negative_sizes(B: int, n: int) -> list[int]:
    """How many of the ``max(1, B // 4)`` negatives each of ``n`` ranks holds."""
    weights = [0 if (n >= 2 and r == 0) else r + 1 for r in range(n)]
    total, K = sum(weights), max(1, B // 4)
    sizes = [K * w // total for w in weights]
    for r in sorted(range(n), key=lambda r: -weights[r])[: K - sum(sizes)]:
        sizes[r] += 1  # the remainder goes to the largest shares
    return sizes


@dataclass(frozen=True)
class RankTargets:
    """One rank's part of a row's targets: what it passes the loss (``labels``,
    ``same_label``, ``text_negatives``), the leaf whose gradient is its ``d_neg`` and that
    leaf's rows of the global negatives (``None`` without negatives)."""

    kwargs: dict
    negatives: torch.Tensor | None = None
    span: slice | None = None


@dataclass(frozen=True)
class Extras:
    """The global labels (``[B]`` int64) and negatives (``[K, D]``, rank 0's first), the
    same on every rank, and how many negatives each rank holds."""

    labels: torch.Tensor
    negatives: torch.Tensor
    negative_sizes: list[int]

    @classmethod
    def make(cls, opts: Options, n: int, txt: torch.Tensor, noise: float) -> Extras:
        """From the seed: the labels ``i % ITEMS``, and each negative a seeded pair's text
        with as much noise again, on ``txt``'s device."""
        B, dim = txt.shape
        sizes = negative_sizes(B, n)
        g = torch.Generator().manual_seed(opts.seed + 1)
        which = torch.randint(B, (sum(sizes),), generator=g)
        extra = noise * torch.randn(sum(sizes), dim, generator=g, dtype=torch.float64)
        negatives = txt.cpu().double()[which] + extra
        labels = torch.arange(B) % ITEMS
        return cls(labels.to(txt.device), negatives.float().to(txt.device), sizes)

    def truth_kwargs(self, targets: str | None) -> dict:
        """What the truths and the plain computations take for this row (global)."""
        if targets is None:
            return {}
        mode = SAME_LABEL[targets]
        labels = {} if mode is None else dict(labels=self.labels, same_label=mode)
        return {**labels, "negatives": self.negatives}

    def for_rank(self, targets, rank: int, sizes: list[int], fault: str | None) -> RankTargets:
        """What rank ``rank`` of the split ``sizes`` passes the loss for this row (its pairs'
        labels, its negatives as a leaf), with ``--inject-fault`` applied: ``labels`` gives
        this rank's pairs labels of their own, ``negatives`` passes none of its negatives
        (``[0, D]``: every rank passes some tensor, or all none)."""
        if targets is None:
            return RankTargets({})
        leaf = self.negatives[self.span(rank)].clone().requires_grad_()
        kwargs = {"text_negatives": leaf[:0] if fault == "negatives" else leaf}
        mode = SAME_LABEL[targets]
        if mode is not None:
            o, b = sum(sizes[:rank]), sizes[rank]
            labels = self.labels[o : o + b]
            if fault == "labels":
                labels = ITEMS + o + torch.arange(b, device=labels.device)
            kwargs.update(labels=labels, same_label=mode)
        return RankTargets(kwargs, leaf, self.span(rank))

    def span(self, rank: int) -> slice:
        """Rank ``rank``'s rows of the global negatives."""
        o = sum(self.negative_sizes[:rank])
        return slice(o, o + self.negative_sizes[rank])


def describe(B: int, n: int) -> str:
    """What the report's header says of the targets' rows."""
    sizes = negative_sizes(B, n)
    return f"; labels i % {ITEMS}, {sum(sizes)} negatives split {sizes}"
