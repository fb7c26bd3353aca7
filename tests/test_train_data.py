"""``palmtree train``'s data, without training: the sampler that splits each global
batch over the ranks, and the digits' captions and split."""

from __future__ import annotations

import numpy as np

from palmtree.train.data import GlobalBatchSampler
from palmtree.train.digits import EVAL_TEMPLATES, TRAIN_TEMPLATES, class_captions, stratified_split
from palmtree.train.tokenizer import WordTokenizer


def test_sampler_splits_global_batches_without_padding():
    n, bs, world = 23, 4, 3  # global batch 12: the second one holds 11 -> sizes 4, 4, 3
    per_rank = []
    for rank in range(world):
        sampler = GlobalBatchSampler(n, bs, rank, world, seed=5)
        sampler.set_epoch(2)
        per_rank.append(list(sampler))
    assert [len(b) for b in per_rank] == [2, 2, 2]
    assert [len(b[1]) for b in per_rank] == [4, 4, 3]
    flat = sorted(i for batches in per_rank for batch in batches for i in batch)
    assert flat == list(range(n))
    # Another epoch, another order; the same epoch, the same order; start_step skips.
    sampler = GlobalBatchSampler(2, bs, 2, world, seed=5)
    assert list(sampler) == [[]]  # a rank can get nothing at all
    sampler = GlobalBatchSampler(n, bs, 0, world, seed=5)
    sampler.set_epoch(2, start_step=1)
    assert list(sampler) == per_rank[0][1:]


def test_sampler_cuts_each_ranks_share_into_micro_batches():
    # Global batches of 12 (2 ranks x 2 micro-batches x 3): 15 pairs make a full step
    # and one of 3 pairs, which rank 0 holds as [3 pairs, nothing] and rank 1 not at all.
    for rank in range(2):
        whole = GlobalBatchSampler(15, 6, rank, 2, seed=5)
        cut = GlobalBatchSampler(15, 3, rank, 2, seed=5, accum_steps=2)
        whole.set_epoch(1)
        cut.set_epoch(1)
        steps, micro = list(whole), list(cut)
        assert len(micro) == len(cut) == 2 * len(steps) == 4
        assert [a + b for a, b in zip(micro[::2], micro[1::2], strict=True)] == steps
    assert [len(b) for b in micro] == [3, 3, 0, 0]  # rank 1
    cut = GlobalBatchSampler(15, 3, 0, 2, seed=5, accum_steps=2)
    cut.set_epoch(1, start_step=1)
    assert [len(b) for b in cut] == [3, 0]


def test_digit_captions_and_split():
    train, held_out = class_captions(TRAIN_TEMPLATES), class_captions(EVAL_TEMPLATES)
    assert "a handwritten seven" in train[7] and "an image of an eight" in train[8]
    assert not set(map(tuple, train)) & set(map(tuple, held_out))
    tok = WordTokenizer.build([c for caps in train for c in caps])
    lengths = {len(tok.encode(c)) for caps in train for c in caps}
    assert min(lengths) == 1 and max(lengths) >= 8  # real padding in every batch
    labels = np.repeat(np.arange(10), 20)
    tr, te = stratified_split(labels, 0.25)
    assert np.bincount(labels[te]).tolist() == [5] * 10 and not set(tr) & set(te)
