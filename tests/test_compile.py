"""``torch.compile(fullgraph=True)`` around palmtree's losses, one process and 2 gloo ranks.

Each compiled call must trace whole (0 graph breaks, ``torch._dynamo.explain``), forward
and backward, for the chunked and reference backends, CLIP and SigLIP, the functions and
the modules; its results must equal eager's within 1e-6 relative and the float64 truth
within the usual bounds; batch sizes that change from step to step compile at most 3
graphs; and a bad value still fails with palmtree's words, on every rank.

Most cases compile with ``backend="aot_eager"``: Dynamo and AOTAutograd trace the forward
and the backward exactly as for Inductor, and the graphs then run op by op, in seconds.
Inductor itself (C++ built for this CPU, tens of seconds a graph) runs in the cases marked
slow, where its fused code must agree with eager within the same 1e-6.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from compile_cases import (
    BIAS,
    DIM,
    LOG_10,
    compiled,
    compiled_error,
    leaves,
    loss_fn,
    ranks_compiled_and_eager,
    run_step,
    step_labels,
)
from world import World

import palmtree
from palmtree import testing
from palmtree.distributed import ClipLossInputError

KINDS = ["clip", "siglip"]
BACKENDS = ["chunked", "reference"]
#: How far compiled may be from eager: 1e-6 of the largest value (a fused graph sums in
#: another order; both are within the float64 bounds, which are checked too).
REL = 1e-6


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = testing.max_error(got, want)
    size = float(want.detach().double().abs().max()) if want.numel() else 0.0
    assert err <= REL * size, f"{name}: compiled is {err:.3e} from eager (size {size:.3e})"


def assert_same_as_eager(got: dict, want: dict, where: str = "") -> None:
    for name in ("loss", "loss_global", "d_img", "d_txt", "d_scale", "d_bias"):
        assert_close(f"{name}{where}", got[name], want[name])


def check_truth(
    kind: str, results: list[dict], img, txt, sizes, where: str = "", **targets
) -> None:
    """Every rank's loss, the joined feature gradients and the scale's (and bias's) mean
    gradient against float64, as tests/test_distributed.py checks eager calls
    (``targets``: the truths' ``labels`` and ``same_label``)."""
    n = len(sizes)
    if kind == "clip":
        exact = testing.clip_truth(img, txt, LOG_10, sizes=sizes, **targets)
        plain = testing.plain_fp32(img, txt, LOG_10, sizes=sizes, **targets)
    else:
        exact = testing.siglip_truth(img, txt, LOG_10, BIAS, sizes=sizes, **targets)
        plain = testing.plain_fp32_siglip(img, txt, LOG_10, BIAS, sizes=sizes, **targets)
    for rank, r in enumerate(results):
        bound = n * float(exact.share_bounds[rank])
        testing.check_scalar(f"loss{where} rank {rank}", r["loss"], n * exact.shares[rank], bound)
        testing.check_scalar(f"loss_global{where}", r["loss_global"], exact.loss, exact.loss_bound)
    for name in ("d_img", "d_txt"):
        got = torch.cat([r[name] for r in results])
        testing.check_tensor(f"{name}{where}", got, n * plain[name], n * getattr(exact, name))
    d_scale = torch.stack([r["d_scale"].double() for r in results]).mean()
    testing.check_scalar(f"d_scale{where}", d_scale, exact.d_scale, exact.d_scale_bound)
    if kind == "siglip":
        d_bias = torch.stack([r["d_bias"].double() for r in results]).mean()
        testing.check_scalar(f"d_bias{where}", d_bias, exact.d_bias, exact.d_bias_bound)


# ------------------------------------------------------------------------- one process


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_one_graph_no_breaks(kind, backend):
    img, txt = testing.make_pairs(24, DIM, seed=1)
    explained = torch._dynamo.explain(loss_fn(kind, backend))(*leaves(img, txt))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_equals_eager_and_float64(kind, backend):
    """Forward and backward traced whole (``fullgraph=True``, AOTAutograd's backward)."""
    img, txt = testing.make_pairs(24, DIM, seed=2)
    fn = loss_fn(kind, backend)
    got = run_step(compiled(fn, "aot_eager"), img, txt)
    assert_same_as_eager(got, run_step(fn, img, txt))
    check_truth(kind, [got], img, txt, [24])


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_inductor_equals_eager_and_float64(kind):
    """What a user gets from a plain ``torch.compile``: Inductor's fused forward and backward."""
    img, txt = testing.make_pairs(40, DIM, seed=3)
    fn = loss_fn(kind, "chunked")
    got = run_step(compiled(fn, "inductor"), img, txt)
    assert_same_as_eager(got, run_step(fn, img, txt))
    check_truth(kind, [got], img, txt, [40])


@pytest.mark.parametrize("kind", KINDS)
def test_varying_batch_sizes_compile_at_most_3_graphs(kind):
    """64, 64, 63, 50, 64: the first size, then one graph with a dynamic batch size."""
    from torch._dynamo.utils import counters

    counters.clear()
    fn = loss_fn(kind, "chunked")
    cfn = compiled(fn, "aot_eager")
    for k, b in enumerate([64, 64, 63, 50, 64]):
        img, txt = testing.make_pairs(b, DIM, seed=10 + k)
        assert_same_as_eager(run_step(cfn, img, txt), run_step(fn, img, txt), f" at B={b}")
    assert counters["stats"]["unique_graphs"] <= 3


def module_step(module, compiler, img, tokens, mask):
    """One forward and backward of ``module`` (compiled by ``compiler``, or eager for
    ``None``): the loss and every parameter's gradient."""
    module.zero_grad(set_to_none=True)
    fn = module if compiler is None else compiled(module, compiler)
    out = fn(img, tokens, mask)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    return out.loss.detach(), grads


@pytest.mark.parametrize("cls", [palmtree.ClipLoss, palmtree.SigLipLoss])
def test_modules_compile_with_token_latents(cls):
    """The modules (projections, masked pooling of token latents, ``[1]``-shaped scalars):
    0 graph breaks, and compiled gradients equal eager's, over varying batch sizes."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    module = cls(image_dim=12, text_dim=10, embed_dim=DIM)
    counters.clear()
    for k, b in enumerate([64, 64, 63, 50, 64]):
        g = torch.Generator().manual_seed(k)
        img, tokens = torch.randn(b, 12, generator=g), torch.randn(b, 5, 10, generator=g)
        mask = torch.rand(b, 5, generator=g) < 0.7
        mask[:, 0] = True
        if k == 0:
            explained = torch._dynamo.explain(module)(img, tokens, mask)
            assert explained.graph_break_count == 0, explained.break_reasons
            counters.clear()
        loss, grads = module_step(module, "aot_eager", img, tokens, mask)
        want_loss, want = module_step(module, None, img, tokens, mask)
        assert_close(f"loss at B={b}", loss, want_loss)
        for name, grad in grads.items():
            assert_close(f"{name} at B={b}", grad, want[name])
    assert counters["stats"]["unique_graphs"] <= 3


def bad_value(what: str):
    """A compiled call with one bad value, and the words it must fail with."""
    img, txt = testing.make_pairs(6, DIM, seed=4)
    scale, mask = torch.tensor(LOG_10), torch.ones(6, 3, dtype=torch.bool)
    tokens = txt[:, None, :].expand(6, 3, DIM).clone()
    options = {}
    if what == "nan":
        img[2, 1] = math.nan
        words = "non-finite values (nan or inf) in image_features"
    elif what == "tokens":
        tokens[4, 0] = math.inf
        words = "non-finite values (nan or inf) in text_features"
    elif what == "mask":
        mask[3] = False
        words = "text_mask has no real token in"
    elif what == "overflow":  # exp(1e4) overflows fp32: its gradient would be inf
        scale, options = torch.tensor(1e4), {"scale_cap": "straight_through"}
        words = "with scale_cap='straight_through' its gradient is exp(logit_scale) * dL/ds"

    def f(i, t, m, s):
        return palmtree.clip_loss(i, t, s, text_mask=m, **options).loss

    return f, (img, tokens, mask, scale), words


@pytest.mark.parametrize("what", ["nan", "tokens", "mask", "overflow"])
def test_bad_values_fail_with_palmtrees_words(what):
    """Checks of values are assertions in the graph: a ``RuntimeError`` with the words of
    eager's ``ClipLossInputError`` (no host sync, no graph break)."""
    f, args, words = bad_value(what)
    with pytest.raises(ClipLossInputError, match=re.escape(words)):
        f(*args)  # eager, for comparison
    with pytest.raises(RuntimeError, match=re.escape(words)):
        compiled(f, "aot_eager")(*args)


def test_static_errors_fail_while_compiling_with_palmtrees_words():
    """A shape problem is found while tracing: with ``fullgraph=True`` torch raises its
    own error, palmtree's message inside; without it the call runs eagerly and raises
    palmtree's ``ClipLossInputError``."""
    img, txt = testing.make_pairs(6, DIM, seed=5)
    words = f"image feature dim {DIM} != text feature dim {DIM - 1}"
    fn = loss_fn("clip", "chunked")
    args = (img, txt[:, 1:], torch.tensor(LOG_10), None)
    with pytest.raises(Exception, match=re.escape(words)):
        compiled(fn, "aot_eager")(*args)
    with pytest.raises(ClipLossInputError, match=re.escape(words)):
        torch.compile(fn, backend="aot_eager")(*args)


# ------------------------------------------------------------------------ 2 gloo ranks

#: Per-rank sizes that change from step to step (uneven, one rank with 1 pair).
SPLITS = [[6, 7], [6, 7], [5, 6], [1, 4], [6, 7]]


@pytest.fixture(scope="module")
def world():
    w = World(2)
    yield w
    w.close()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_compiled_equal_eager_and_float64(world, kind, backend):
    """The exchange and the rows' gathers are functional collectives the compiler traces:
    0 graph breaks on each rank, at most 3 graphs over five splits, and each step equal
    to eager on every rank and to one float64 process on the global batch."""
    check_two_ranks(world.run(ranks_compiled_and_eager, kind, backend, SPLITS), kind)


@pytest.mark.parametrize("same_label", ["positive", "ignore"])
@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_compiled_with_labels(world, kind, same_label):
    """Same-item labels under ``torch.compile(fullgraph=True)`` on two ranks: the ids'
    gather and the counts from sorted ids trace whole (0 graph breaks, at most 3 graphs
    over five splits), and each step equals eager and one float64 process."""
    args = (kind, "chunked", SPLITS, "aot_eager", same_label)
    check_two_ranks(world.run(ranks_compiled_and_eager, *args), kind, same_label)


def check_two_ranks(results: list[dict], kind: str, same_label: str | None = None) -> None:
    """:func:`ranks_compiled_and_eager`'s results over :data:`SPLITS`: no graph break
    and at most 3 graphs on each rank, each step equal to eager on every rank and to one
    float64 process on the global batch (with :func:`step_labels` under ``same_label``)."""
    for rank, r in enumerate(results):
        assert r["breaks"] == 0, f"rank {rank}"
        assert r["graphs"] <= 3, f"rank {rank}: {r['graphs']} graphs"
    for k, sizes in enumerate(SPLITS):
        where = f" at {sizes}" + ("" if same_label is None else f" ({same_label})")
        for rank, r in enumerate(results):
            step = r["steps"][k]
            assert_same_as_eager(step["compiled"], step["eager"], f"{where} rank {rank}")
        img, txt = testing.make_pairs(sum(sizes), DIM, seed=40 + k)
        steps = [r["steps"][k]["compiled"] for r in results]
        targets = {}
        if same_label is not None:
            targets = dict(labels=step_labels(sum(sizes)), same_label=same_label)
        check_truth(kind, steps, img, txt, sizes, where, **targets)


def test_two_ranks_compiled_refuse_an_empty_rank(world):
    """A graph traced for 0 rows would hold fewer collectives than the other ranks': the
    exchange refuses it on every rank, before any other collective (docs/design.md §9)."""
    words = "a rank passed 0 pairs to a compiled loss"
    for rank, (kind, message) in enumerate(world.run(compiled_error, 0, "empty")):
        assert kind == "RuntimeError" and words in message, (rank, kind, message)


@pytest.mark.slow
def test_two_ranks_inductor(world):
    """Inductor on 2 ranks: the losses within 1e-6 of eager's, every result within the
    float64 bounds. Its fused reductions sum the feature gradients' terms in another
    order than eager, so entries differ by their terms' rounding, not the result's (1.5e-6
    of the largest ``d_txt`` entry measured at [6, 7]); the float64 bound holds both."""
    splits = SPLITS[:3]
    results = world.run(ranks_compiled_and_eager, "clip", "chunked", splits, "inductor")
    for k, sizes in enumerate(splits):
        for rank, r in enumerate(results):
            assert r["breaks"] == 0
            got, want = r["steps"][k]["compiled"], r["steps"][k]["eager"]
            for name in ("loss", "loss_global"):
                assert_close(f"{name} at {sizes} rank {rank}", got[name], want[name])
        img, txt = testing.make_pairs(sum(sizes), DIM, seed=40 + k)
        steps = [r["steps"][k]["compiled"] for r in results]
        check_truth("clip", steps, img, txt, sizes, f" at {sizes}")


@pytest.mark.parametrize(
    ("what", "words"),
    [
        ("nan", "rank 1: non-finite values (nan or inf) in image_features"),
        ("mask", "rank 1: text_mask has no real token in some row(s)"),
        ("scale", "logit_scale differs across ranks"),
    ],
)
def test_two_ranks_a_bad_value_fails_on_every_rank(world, what, words):
    """A bad value on rank 1 travels in the exchange: both ranks raise, naming it."""
    for rank, (kind, message) in enumerate(world.run(compiled_error, 1, what)):
        assert kind == "RuntimeError" and words in message, (rank, kind, message)
