"""The distributed contract, checked on real spawned gloo ranks against float64.

Every world size 1..4 runs even, uneven and empty-rank splits, per-rank upstream
gradients, every backend, bad inputs (same error on every rank, no hang) and a
DDP-wrapped model whose gradients must equal the single-process ones.
"""

from __future__ import annotations

import math

import pytest
import torch
from dist_cases import (
    ddp_gradients,
    empty_world,
    loss_and_grads,
    outside_the_group,
    padded_tokens_do_not_matter,
    raises_on_bad_input,
    raises_on_bad_option,
    subgroup_loss,
)
from towers import check_gradients, gradients, split, tower_batch
from world import World

from palmtree import testing
from palmtree.backends import triton_available

BACKENDS = ["reference", "chunked"] + (["fused"] if triton_available() else [])

SPLITS = {
    1: [[13]],
    2: [[8, 8], [11, 5]],
    3: [[7, 0, 9], [1, 2, 3]],
    4: [[5, 5, 5, 5], [9, 0, 3, 4], [0, 6, 0, 2]],
}
UPSTREAM = [1.0, 0.5, 2.0, -1.0]
LOG_10 = math.log(10.0)


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda n: f"N{n}")
def world(request):
    w = World(request.param)
    yield w
    w.close()


def _check(results, sizes, weights, dim, seed, log_scale, backend, kind="correlated"):
    """Every rank's loss, the gradients and the global metrics against float64.

    Each rank returns ``N * share_r`` and gets ``N * dJ/d(its features)``; a DDP-style
    mean over ranks of the scale's gradient is ``dJ/d(log scale)``. Sums (losses, the
    scale's gradient) are held to the bounds of :mod:`palmtree.testing`; gradient
    tensors to twice the error of plain fp32 autograd.
    """
    n = len(sizes)
    img, txt = testing.make_pairs(sum(sizes), dim, seed, kind=kind)
    exact = testing.clip_truth(img, txt, log_scale, sizes=sizes, weights=weights)
    plain = testing.plain_fp32(img, txt, log_scale, sizes=sizes, weights=weights)
    for rank, r in enumerate(results):
        testing.check_scalar(
            f"{backend} loss on rank {rank}",
            r["loss"],
            n * exact.shares[rank],
            n * float(exact.share_bounds[rank]),
        )
    d_img = torch.cat([r["d_img"] for r in results])
    d_txt = torch.cat([r["d_txt"] for r in results])
    testing.check_tensor(f"{backend} d_img", d_img, n * plain["d_img"], n * exact.d_img)
    testing.check_tensor(f"{backend} d_txt", d_txt, n * plain["d_txt"], n * exact.d_txt)
    d_scale = torch.stack([r["d_scale"].double() for r in results]).mean()
    testing.check_scalar(f"{backend} d_scale", d_scale, exact.d_scale, exact.d_scale_bound)
    for r in results:
        m = r["metrics"]
        assert m["b_global"] == sum(sizes)
        testing.check_scalar(f"{backend} loss_global", m["loss"], exact.loss, exact.loss_bound)
        assert m["loss"] == results[0]["metrics"]["loss"]  # identical on every rank


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_and_gradients_match_single_process(world, backend):
    n = world.size
    for k, sizes in enumerate(SPLITS[n]):
        for weights in ([1.0] * n, UPSTREAM[:n]):
            args = (backend, "ieee", sizes, weights, 24, 100 + k, LOG_10)
            results = world.run(loss_and_grads, *args, chunk_size=5)
            _check(results, sizes, weights, 24, 100 + k, LOG_10, backend)
            local = [r["metrics"]["b_local"] for r in results]
            assert local == sizes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["correlated", "adversarial", "aligned"])
def test_scale_above_the_cap(world, backend, kind):
    """s clamped at 100: all similarities near -1 with duplicated pairs, and a peaked
    softmax whose loss is far below 1e-3 (it must keep its digits)."""
    n = world.size
    sizes = SPLITS[n][-1]
    log_scale = math.log(100.0) + 0.5
    results = world.run(
        loss_and_grads, backend, "ieee", sizes, [1.0] * n, 16, 7, log_scale, kind=kind
    )
    _check(results, sizes, [1.0] * n, 16, 7, log_scale, backend, kind)
    for r in results:
        assert r["metrics"]["logit_scale"] == pytest.approx(100.0)
        assert float(r["d_scale"]) == 0.0  # clamp: no gradient above the cap


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_group_limits_the_negatives(world, backend, loss):
    if world.size != 4:
        pytest.skip("two groups of two ranks")
    sizes = [3, 5, 4, 0]
    results = world.run(subgroup_loss, backend, sizes, loss)
    for mine in (0, 1):
        part = sizes[2 * mine : 2 * mine + 2]
        img, txt = testing.make_pairs(sum(part), 8, seed=11 + mine)
        if loss == "clip":
            exact = testing.clip_truth(img, txt, 2.0, sizes=part)
            plain = testing.plain_fp32(img, txt, 2.0, sizes=part)
        else:
            exact = testing.siglip_truth(img, txt, 2.0, -3.0, sizes=part)
            plain = testing.plain_fp32_siglip(img, txt, 2.0, -3.0, sizes=part)
        ranks = results[2 * mine : 2 * mine + 2]
        for r in ranks:
            assert r["metrics"]["b_global"] == sum(part)
            testing.check_scalar("group loss", r["metrics"]["loss"], exact.loss, exact.loss_bound)
        d_img = torch.cat([r["d_img"] for r in ranks])
        testing.check_tensor("group d_img", d_img, 2 * plain["d_img"], 2 * exact.d_img)


@pytest.mark.parametrize("kind", ["nan", "dim", "dtype", "local_dim", "empty_mask"])
def test_bad_input_raises_on_every_rank(world, kind):
    n = world.size
    if n == 1 and kind in ("dim", "dtype"):
        pytest.skip("a cross-rank mismatch needs two ranks")
    bad = n - 1
    results = world.run(raises_on_bad_input, bad, kind, "chunked", expect_raise=True)
    words = {
        "nan": "non-finite",
        "dim": "feature dim differs across ranks",
        "dtype": "feature dtype differs across ranks",
        "local_dim": "image feature dim 8 != text feature dim 5",
        "empty_mask": "no real token in row(s) 2",
    }[kind]
    for r in results:
        assert r.type == "ClipLossInputError", r
        assert words in r.message
        if kind in ("nan", "local_dim", "empty_mask") and n > 1:
            assert f"rank {bad}" in r.message


OPTION_ERRORS = {
    "precision": "precision must be one of",
    "scale_cap": "scale_cap must be one of",
    "chunk_size": "chunk_size must be None or an integer >= 1, got -1",
    "logit_scale_max": "logit_scale_max must be a number > 0",
    "backend": "backend must be one of",
    "fused_cannot_run": "backend='fused' cannot run here",
    "meta_features": "meta device",
    "meta_scale": "logit_scale is on the meta device",
    "int_mask": "text_mask must hold only 0 and 1",
    "other_backend": "backend differs across ranks (rank 0: chunked",
    "other_scale": "logit_scale differs across ranks (rank 0: 2.0",
    "other_cap": "logit_scale_max differs across ranks (rank 0: 100.0",
    "text_dtype": "text feature dtype differs across ranks",
    "other_loss": "loss differs across ranks (rank 0: clip",
}


@pytest.mark.parametrize("kind", OPTION_ERRORS)
def test_one_bad_option_raises_the_same_error_on_every_rank(world, kind):
    """Bad option values on one rank, and options the ranks must share but do not: one
    message on every rank, naming the rank, never a hang or a silently wrong loss."""
    n = world.size
    mismatch = "differs across ranks" in OPTION_ERRORS[kind]
    if n == 1 and mismatch:
        pytest.skip("a cross-rank mismatch needs two ranks")
    bad = n - 1
    results = world.run(raises_on_bad_option, bad, kind, expect_raise=True)
    messages = {r.message for r in results if hasattr(r, "message")}
    assert len(messages) == 1, results  # the same error everywhere
    for r in results:
        assert r.type == "ClipLossInputError", r
        assert OPTION_ERRORS[kind] in r.message
        if n > 1:
            assert f"rank {bad}" in r.message


def test_a_rank_outside_the_group_is_told_so(world):
    if world.size != 4:
        pytest.skip("a group of two ranks out of four")
    results = world.run(outside_the_group, expect_raise=True)
    assert results[0] == results[1] == 8 and results[3] == "not called"
    assert results[2].type == "ClipLossInputError"
    assert "global rank 2 is not a member" in results[2].message.replace("(", "").replace(")", "")


def test_nan_in_padded_token_positions_does_not_matter(world):
    for dirty, clean in world.run(padded_tokens_do_not_matter):
        assert dirty == clean


def test_empty_global_batch_is_an_error(world):
    for r in world.run(empty_world, "chunked", expect_raise=True):
        assert r.type == "ClipLossInputError" and "global batch is empty" in r.message


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_ddp_gradients_equal_single_process(world, backend, loss):
    """A DDP-wrapped two-tower model on uneven ranks against the same model in float64
    (:func:`towers.check_gradients` says how close)."""
    n = world.size
    sizes = SPLITS[n][-1]
    grads = world.run(ddp_gradients, backend, sizes, loss)
    pieces = [[piece] for piece in split(tower_batch(sum(sizes)), sizes)]
    exact, plain, bounds = gradients(loss, backend, pieces)
    for rank, got in enumerate(grads):
        check_gradients(got, exact, plain, bounds, f" on rank {rank}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_siglip_matches_single_process(world, backend):
    """The sigmoid loss: every split (empty ranks too) and per-rank upstream weights."""
    n = world.size
    for k, sizes in enumerate(SPLITS[n]):
        for weights in ([1.0] * n, UPSTREAM[:n]):
            log_scale, bias = math.log(10.0), -4.0 + k
            results = world.run(
                loss_and_grads,
                backend,
                "ieee",
                sizes,
                weights,
                24,
                200 + k,
                log_scale,
                bias=bias,
                chunk_size=5,
            )
            img, txt = testing.make_pairs(sum(sizes), 24, 200 + k)
            exact = testing.siglip_truth(img, txt, log_scale, bias, sizes=sizes, weights=weights)
            plain = testing.plain_fp32_siglip(
                img, txt, log_scale, bias, sizes=sizes, weights=weights
            )
            for rank, r in enumerate(results):
                want, bound = n * exact.shares[rank], n * float(exact.share_bounds[rank])
                testing.check_scalar(f"{backend} loss on rank {rank}", r["loss"], want, bound)
                m = r["metrics"]
                testing.check_scalar("loss_global", m["loss"], exact.loss, exact.loss_bound)
                testing.check_scalar("loss_pos", m["loss_pos"], exact.loss_pos, exact.pos_bound)
                assert m["b_local"] == sizes[rank] and m["b_global"] == sum(sizes)
            for name in ("d_img", "d_txt"):
                ours = torch.cat([r[name] for r in results])
                testing.check_tensor(name, ours, n * plain[name], n * getattr(exact, name))
            for name in ("d_scale", "d_bias"):
                ours = torch.stack([r[name].double() for r in results]).mean()
                bound = getattr(exact, f"{name}_bound")
                testing.check_scalar(name, ours, getattr(exact, name), bound)
