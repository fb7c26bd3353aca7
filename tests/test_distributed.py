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
    TwoTower,
    ddp_gradients,
    empty_world,
    loss_and_grads,
    raises_on_bad_input,
    subgroup_loss,
    tower_batch,
)
from oracle import LOG_10, assert_close_to_truth, make_batch, truth
from world import World

from palmtree.backends import triton_available

BACKENDS = ["reference", "chunked"] + (["fused"] if triton_available() else [])

SPLITS = {
    1: [[13]],
    2: [[8, 8], [11, 5]],
    3: [[7, 0, 9], [1, 2, 3]],
    4: [[5, 5, 5, 5], [9, 0, 3, 4], [0, 6, 0, 2]],
}
UPSTREAM = [1.0, 0.5, 2.0, -1.0]


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda n: f"N{n}")
def world(request):
    w = World(request.param)
    yield w
    w.close()


def _check(results, sizes, weights, dim, seed, log_scale, backend, noise=0.7):
    n = len(sizes)
    img, txt = make_batch(sum(sizes), dim, seed, noise)
    exact = truth(img, txt, log_scale, sizes, weights)
    naive = truth(img, txt, log_scale, sizes, weights, dtype=torch.float32)
    # Each rank returns N * share_r and gets N * dJ/d(its features); a DDP-style mean
    # over ranks of the scale's gradient is dJ/d(log scale).
    loss = torch.stack([r["loss"] for r in results])
    eps_logit = torch.finfo(torch.float32).eps * min(math.exp(log_scale), 100.0)
    assert_close_to_truth(
        f"{backend} loss", loss, n * naive["shares"], n * exact["shares"], atol=eps_logit
    )
    d_img = torch.cat([r["d_img"] for r in results])
    d_txt = torch.cat([r["d_txt"] for r in results])
    assert_close_to_truth(f"{backend} d_img", d_img, n * naive["d_img"], n * exact["d_img"])
    assert_close_to_truth(f"{backend} d_txt", d_txt, n * naive["d_txt"], n * exact["d_txt"])
    d_scale = torch.stack([r["d_scale"] for r in results]).mean()
    assert_close_to_truth(f"{backend} d_scale", d_scale, naive["d_scale"], exact["d_scale"])
    for r in results:
        m = r["metrics"]
        assert m["b_global"] == sum(sizes)
        assert m["loss"] == pytest.approx(float(exact["loss"]), rel=1e-5, abs=4 * eps_logit)
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
@pytest.mark.parametrize("noise", [0.7, -1.0], ids=["correlated", "adversarial"])
def test_scale_above_the_cap(world, backend, noise):
    """s clamped at 100; with all similarities near -1 and duplicated pairs too."""
    n = world.size
    sizes = SPLITS[n][-1]
    log_scale = float(torch.tensor(100.0).log()) + 0.5
    results = world.run(
        loss_and_grads, backend, "ieee", sizes, [1.0] * n, 16, 7, log_scale, noise=noise
    )
    _check(results, sizes, [1.0] * n, 16, 7, log_scale, backend, noise)
    for r in results:
        assert r["metrics"]["logit_scale"] == pytest.approx(100.0)
        assert float(r["d_scale"]) == 0.0  # clamp: no gradient above the cap


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_limits_the_negatives(world, backend):
    if world.size != 4:
        pytest.skip("two groups of two ranks")
    sizes = [3, 5, 4, 0]
    results = world.run(subgroup_loss, backend, sizes)
    for mine in (0, 1):
        part = sizes[2 * mine : 2 * mine + 2]
        img, txt = make_batch(sum(part), 8, seed=11 + mine)
        exact = truth(img, txt, 2.0, part)
        ranks = results[2 * mine : 2 * mine + 2]
        for r in ranks:
            assert r["metrics"]["b_global"] == sum(part)
            assert r["metrics"]["loss"] == pytest.approx(float(exact["loss"]), rel=1e-5)
        d_img = torch.cat([r["d_img"] for r in ranks])
        torch.testing.assert_close(d_img, 2 * exact["d_img"].float(), rtol=1e-4, atol=1e-6)


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


def test_empty_global_batch_is_an_error(world):
    for r in world.run(empty_world, "chunked", expect_raise=True):
        assert r.type == "ClipLossInputError" and "global batch is empty" in r.message


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_ddp_gradients_equal_single_process(world, backend):
    n = world.size
    sizes = SPLITS[n][-1]
    grads = world.run(ddp_gradients, backend, sizes)
    model = TwoTower(backend)
    pixels, tokens, mask = tower_batch(sum(sizes))
    model(pixels, tokens, mask).loss.backward()
    for name, p in model.named_parameters():
        for rank, g in enumerate(grads):
            err = float((g[name] - p.grad).norm() / p.grad.norm())
            assert err <= 1e-5, f"{name} on rank {rank}: relative error {err:.2e}"
