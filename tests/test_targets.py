"""Same-item labels and extra negatives (docs/design.md §11), against one float64 process.

On 1, 2 and 3 gloo ranks: duplicates inside a rank and across ranks, all labels equal,
labels all distinct (today's loss), different numbers of negatives per rank (0
included), empty ranks, per-rank upstream weights; every gradient (images, texts,
negatives, scale, bias) within the bounds of :mod:`palmtree.testing`. Then the metrics,
the modules, and bad labels or negatives on one rank: one error on every rank.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from dist_cases import targets_bad_input, targets_loss_and_grads
from world import World

import palmtree
from palmtree import testing

#: ``fused`` runs in the Triton interpreter here (tests/conftest.py), compiled on CUDA.
BACKENDS = ["reference", "chunked", "fused"]
SPLITS = {1: [[10]], 2: [[6, 5], [0, 9]], 3: [[4, 0, 6], [3, 3, 3]]}
NEGATIVES = {1: [[0], [3]], 2: [[0, 4], [2, 3]], 3: [[1, 0, 3], [0, 0, 2]]}
UPSTREAM = [1.0, 0.5, -2.0]
DIM, LOG_SCALE, BIAS = 16, 2.5, -2.0


def _labels(B: int, kind: str) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "distinct":
        return torch.randperm(B, generator=torch.Generator().manual_seed(1)) * 7919 - 10**12
    if kind == "equal":
        return torch.full((B,), 42)
    # a few items, each spread over the batch (so across ranks): ids -3, 5, 2**40
    return torch.tensor([-3, 5, 2**40])[torch.arange(B) % 3]


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda n: f"N{n}")
def world(request):
    w = World(request.param)
    yield w
    w.close()


def _inputs(sizes, neg_sizes):
    img, txt = testing.make_pairs(sum(sizes), DIM, seed=5)
    negs = testing.make_pairs(sum(neg_sizes or [0]) + 1, DIM, seed=6)[1][1:]
    return img, txt, (None if neg_sizes is None else negs)


def _check(loss, results, sizes, neg_sizes, labels, mode, weights):
    """``results`` (one dict per rank) against float64: the losses and scalar gradients
    within their bounds, each tensor within 2x the plain fp32 error."""
    n = len(sizes)
    img, txt, negs = _inputs(sizes, neg_sizes)
    kw = dict(sizes=sizes, weights=weights, labels=labels, same_label=mode)
    if loss == "clip":
        exact = testing.clip_truth(img, txt, LOG_SCALE, negatives=negs, **kw)
        fn = functools.partial(testing.plain_fp32, logit_scale=LOG_SCALE, **kw)
    else:
        exact = testing.siglip_truth(img, txt, LOG_SCALE, BIAS, negatives=negs, **kw)
        fn = functools.partial(
            testing.plain_fp32_siglip, logit_scale=LOG_SCALE, logit_bias=BIAS, **kw
        )
    # The plain fp32 error as its worst of four summation orders (testing.worst_of_orders).
    plain = testing.worst_of_orders(fn, img, txt, vars(exact), negatives=negs)
    for rank, r in enumerate(results):
        want, bound = n * exact.shares[rank], n * float(exact.share_bounds[rank])
        testing.check_scalar(f"{loss} loss on rank {rank}", r["loss"], want, bound)
        testing.check_scalar("loss_global", r["metrics"]["loss"], exact.loss, exact.loss_bound)
    names = ["d_img", "d_txt"] + ([] if negs is None else ["d_neg"])
    for name in names:
        ours = torch.cat([r[name] for r in results])
        testing.check_tensor(name, ours, n * plain[name], n * getattr(exact, name))
    scalars = ["d_scale"] + (["d_bias"] if loss == "siglip" else [])
    for name in scalars:
        ours = torch.stack([r[name].double() for r in results]).mean()
        testing.check_scalar(name, ours, getattr(exact, name), getattr(exact, f"{name}_bound"))


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["positive", "ignore"])
def test_labels_and_negatives_match_one_float64_process(world, loss, backend, mode):
    n = world.size
    for k, sizes in enumerate(SPLITS[n]):
        for kind in ("spread", "equal", "distinct"):
            for neg_sizes in (None, NEGATIVES[n][k]):
                labels = _labels(sum(sizes), kind)
                weights = UPSTREAM[:n] if k else [1.0] * n
                args = (loss, backend, sizes, neg_sizes, labels, mode, weights)
                results = world.run(targets_loss_and_grads, *args)
                _check(loss, results, sizes, neg_sizes, labels, mode, weights)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_negatives_alone_match_one_float64_process(world, loss):
    n = world.size
    sizes, neg_sizes = SPLITS[n][-1], NEGATIVES[n][-1]
    for backend in BACKENDS:
        args = (loss, backend, sizes, neg_sizes, None, "positive", [1.0] * n)
        _check(loss, world.run(targets_loss_and_grads, *args), sizes, neg_sizes, None, "x", None)


KINDS = ["float", "length", "width", "one_rank", "negatives_one_rank", "mode", "nan"]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_labels_or_negatives_raise_on_every_rank(world, kind):
    n = world.size
    if n == 1 and kind.endswith("one_rank"):
        pytest.skip("one rank only needs two ranks")
    results = world.run(targets_bad_input, n - 1, kind, expect_raise=True)
    assert all(r.type == "ClipLossInputError" for r in results), results
    messages = {r.message for r in results}
    assert len(messages) == 1, messages
    text = messages.pop()
    expected = {
        "float": "labels must be an integer tensor",
        "length": "labels must have shape",
        "width": "text_negatives must have shape",
        "one_rank": "labels given differs across ranks",
        "negatives_one_rank": "text_negatives given differs across ranks",
        "mode": "same_label must be one of",
        "nan": "non-finite values (nan or inf) in text_negatives",
    }[kind]
    assert expected in text, text
    if not kind.endswith("one_rank") and n > 1:
        assert f"rank {n - 1}" in text, text


def _accuracies(img, txt, labels, mode):
    """The fraction of rows (columns) whose largest allowed logit is at a target."""
    s = torch.nn.functional.normalize(img.double()) @ torch.nn.functional.normalize(txt.double()).T
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool)
    out = []
    for block in (s, s.T):
        if mode == "ignore":
            block = block.masked_fill(same & ~eye, -math.inf)
            at = eye
        else:
            at = same
        best = block.masked_fill(~at, -math.inf).amax(1)
        out.append(float((best >= block.amax(1)).double().mean()))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("mode", ["positive", "ignore"])
def test_accuracy_counts_a_row_right_at_its_best_allowed_column(backend, loss, mode):
    img, txt = testing.make_pairs(30, 8, seed=2, kind="correlated")
    labels = torch.arange(30) % 4
    kw = dict(labels=labels, same_label=mode, backend=backend, chunk_size=7)
    if loss == "clip":
        out = palmtree.clip_loss(img, txt, LOG_SCALE, **kw)
    else:
        out = palmtree.siglip_loss(img, txt, LOG_SCALE, BIAS, **kw)
    i2t, t2i = _accuracies(img, txt, labels, mode)
    assert float(out.acc_i2t) == pytest.approx(i2t) and float(out.acc_t2i) == pytest.approx(t2i)
    plain = palmtree.clip_loss(img, txt, LOG_SCALE) if loss == "clip" else None
    if plain is not None and mode == "positive":
        assert float(out.acc_i2t) > float(plain.acc_i2t)  # same-class texts count as right


def test_modules_take_labels_and_project_the_negatives():
    torch.manual_seed(0)
    img, txt = torch.randn(6, 8), torch.randn(6, 12)
    negs = torch.randn(4, 12, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    for module in (
        palmtree.ClipLoss(8, 12, 8, same_label="ignore"),
        palmtree.SigLipLoss(8, 12, 8),
    ):
        out = module(img, txt, labels=labels, text_negatives=negs)
        out.loss.backward()
        assert negs.grad is not None and negs.grad.abs().sum() > 0
        assert module.text_proj.weight.grad is not None
        negs.grad = None
    with pytest.raises(palmtree.ClipLossInputError, match="text_negatives have dim 8"):
        palmtree.ClipLoss(8, 12, 8)(img, txt, text_negatives=torch.randn(2, 8))


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_compiles_whole_with_labels_and_negatives(loss):
    """``torch.compile(fullgraph=True)``: no graph break (the counts come from sorted ids,
    the chunks' own logits in static shapes), and the eager result (aot_eager: the same
    kernels, so within 1e-6 relative, as tests/test_compile.py holds compiled calls)."""
    img, txt = testing.make_pairs(12, 8, seed=3)
    negs = testing.make_pairs(4, 8, seed=4)[1]
    labels = torch.arange(12) % 5

    def step(i, t, n, theta):
        kw = dict(labels=labels, text_negatives=n, backend="chunked", chunk_size=5)
        if loss == "clip":
            return palmtree.clip_loss(i, t, theta, **kw).loss
        return palmtree.siglip_loss(i, t, theta, BIAS, **kw).loss

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaves = [x.clone().requires_grad_() for x in (img, txt, negs)]
        theta = torch.tensor(LOG_SCALE, requires_grad=True)
        value = fn(*leaves, theta)
        value.backward()
        results.append([value.detach(), *(x.grad for x in leaves), theta.grad])
    for eager, compiled in zip(*results, strict=True):
        assert testing.max_error(compiled, eager) <= 1e-6 * float(eager.abs().max())
