"""``palmtree.accumulate`` with same-item labels and negatives encoded per micro-batch.

On 1 and 2 gloo ranks, float64 towers whose micro-batches give image features, token
latents and pooled extra negatives: the gradients after ``accumulate`` must be those of
one forward and backward of the same towers on each rank's micro-batches at once, with
the same loss call (the same ``labels`` in order, the same negatives). Both paths hand
the towers bit-identical feature gradients (the loss sees the same values); they differ
only in how float64 groups the towers' sums over rows, ``<= gamma_64(rows) sum |terms|``,
far below the ``1e-12`` of the largest entry allowed here. A negative's gradient sent to
another micro-batch, or labels out of order, are off by O(1).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from towers import Towers, split, tower_batch
from world import World

import palmtree

MICRO = {1: [[5, 3, 4]], 2: [[4, 2], []]}
NEG = {1: [2, 0, 3], 2: [3, 1]}  # negatives per micro-batch, in order over the ranks


class WithNegatives(Towers):
    """:class:`towers.Towers` in float64 that also encodes hard-negative captions,
    mean-pooled to ``[n, 7]`` by the text tower."""

    def __init__(self):
        super().__init__()
        self.double()

    def forward(self, pixels, tokens, mask, neg_tokens, neg_mask):
        img, txt, mask = super().forward(pixels.double(), tokens, mask)
        negatives = palmtree.masked_mean_pool(self.text(neg_tokens), neg_mask)
        return img, txt, mask, negatives


def _micro_batches(rank, n):
    """This rank's micro-batches (towers' inputs and negative captions) and labels."""
    sizes = [sum(m) for m in MICRO[n]]
    everything = split(tower_batch(sum(sizes)), sizes)[rank]
    pieces = split(everything, MICRO[n][rank])
    first = sum(len(m) for m in MICRO[n][:rank])
    labels = torch.arange(sum(sizes)) % 3 * 10**9  # duplicates within and across ranks
    o = sum(sizes[:rank])
    out, start = [], o
    for k, piece in enumerate(pieces):
        neg_tokens, neg_mask = tower_batch(NEG[n][first + k], seed=40 + first + k)[1:]
        out.append((*piece, neg_tokens, neg_mask))
    label_parts = []
    for m in MICRO[n][rank]:
        label_parts.append(labels[start : start + m])
        start += m
    return out, label_parts


def _loss(kind, mode):
    """:func:`towers.make_loss`'s module with ``same_label=mode``, in float64."""
    torch.manual_seed(1)
    cls = palmtree.ClipLoss if kind == "clip" else palmtree.SigLipLoss
    return cls(image_dim=10, text_dim=7, embed_dim=8, backend="chunked", same_label=mode).double()


def accumulate_or_direct(rank, n, how, kind, mode):
    towers, loss_fn = WithNegatives(), _loss(kind, mode)
    pieces, labels = _micro_batches(rank, n)
    if how == "accumulate":
        palmtree.accumulate(towers, loss_fn, pieces, labels=labels)
    else:
        outs = [towers(*p) for p in pieces]
        if outs:
            img, txt, mask, negs = (torch.cat(x) for x in zip(*outs, strict=True))
            y = torch.cat(labels)
        else:  # an empty rank: no rows, and [0, D] negatives as every rank passes some
            img, txt = torch.empty(0, 10).double(), torch.empty(0, 5, 7).double()
            mask, negs = torch.empty(0, 5, dtype=torch.long), torch.empty(0, 7).double()
            y = torch.empty(0, dtype=torch.long)
        loss_fn(img, txt, mask, labels=y, text_negatives=negs).loss.backward()
        if n > 1:  # what accumulate's one all-reduce does: the mean over ranks
            for p in [*towers.parameters(), *loss_fn.parameters()]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= n
    grads = {f"towers.{k}": p.grad for k, p in towers.named_parameters()}
    grads.update({f"loss.{k}": p.grad for k, p in loss_fn.named_parameters()})
    return grads


@pytest.fixture(scope="module", params=[1, 2], ids=lambda n: f"N{n}")
def world(request):
    w = World(request.param)
    yield w
    w.close()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("mode", ["positive", "ignore"])
def test_accumulate_equals_one_pass_with_labels_and_negatives(world, kind, mode):
    n = world.size
    got = world.run(accumulate_or_direct, "accumulate", kind, mode)
    want = world.run(accumulate_or_direct, "direct", kind, mode)
    for rank in range(n):
        for name, g in want[rank].items():
            ours = got[rank][name]
            assert ours is not None, name
            top = float(g.abs().max())
            err = float((ours.double() - g.double()).abs().max())
            assert err <= 1e-12 * top, f"rank {rank} {name}: {err:.2e} of {top:.2e}"


def test_labels_must_match_the_micro_batches():
    towers = WithNegatives()
    pieces, labels = _micro_batches(0, 1)
    with pytest.raises(palmtree.ClipLossInputError, match="labels holds 2 tensors for 3"):
        palmtree.accumulate(towers, _loss("clip", "positive"), pieces, labels=labels[:2])
