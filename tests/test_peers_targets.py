"""What ``text_negatives`` reproduces: sentence-transformers' ``MultipleNegativesRankingLoss``
with hard negatives, on one process.

MNRL scores each query against every positive and every hard negative of the batch
(``scale * cos``) and takes the cross-entropy at its own positive: palmtree's image->text
direction with the hard negatives as ``text_negatives`` (``loss_i2t``). With
``directions=("query_to_doc", "doc_to_query")`` and ``partition_mode="per_direction"``
it also takes the documents as queries against every query, averaged: palmtree's whole
CLIP loss. Both are checked against palmtree's float64 truth within its bound (MNRL is a
plain fp32 formation; at these losses, about 2, plain fp32 is well inside the bound), and
palmtree's own value too.
"""

from __future__ import annotations

import math

import pytest
import torch

import palmtree
from palmtree import testing

losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")

SCALE = 20.0  # MNRL's default


def _batch():
    queries, docs = testing.make_pairs(12, 16, seed=4)
    hard = [testing.make_pairs(12, 16, seed=5 + k)[1] for k in range(2)]
    return queries, docs, hard


@pytest.mark.parametrize("symmetric", [False, True])
def test_mnrl_with_hard_negatives_is_clip_with_text_negatives(symmetric):
    queries, docs, hard = _batch()
    kw = {}
    if symmetric:
        kw = dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
    mnrl = losses.MultipleNegativesRankingLoss(None, scale=SCALE, **kw)
    theirs = mnrl.compute_loss_from_embeddings([queries, docs, *hard], labels=None)

    negatives = torch.cat(hard)
    ours = palmtree.clip_loss(queries, docs, math.log(SCALE), text_negatives=negatives)
    exact = testing.clip_truth(queries, docs, math.log(SCALE), negatives=negatives)
    if symmetric:
        testing.check_scalar("MNRL, both directions", theirs, exact.loss, exact.loss_bound)
        testing.check_scalar("palmtree loss", ours.loss, exact.loss, exact.loss_bound)
    else:
        # The i2t direction alone: half the terms of the loss, so twice its bound.
        bound = 2 * exact.loss_bound
        testing.check_scalar("MNRL", theirs, exact.loss_i2t, bound)
        testing.check_scalar("palmtree loss_i2t", ours.loss_i2t, exact.loss_i2t, bound)
