"""What a call brings besides features: one-element parameters, scales at the edge of fp32,
SigLIP's uncapped default, and a loss computed on some ranks only."""

from __future__ import annotations

import logging
import math
import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from world import World

import palmtree
from palmtree import ClipLossInputError, testing
from palmtree.backends import triton_available
from palmtree.distributed import free_port

BACKENDS = ["reference", "chunked"] + (["fused"] if triton_available() else [])
SHAPES = [(), (1,), (1, 1)]


def run(loss, img, txt, scale, bias=None, **kw):
    """The loss and its gradients; ``scale`` (and ``bias``) are leaves of any shape."""
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    if loss == "clip":
        out = palmtree.clip_loss(i, t, scale, **kw)
    else:
        out = palmtree.siglip_loss(i, t, scale, bias, **kw)
    out.loss.backward()
    return out, i.grad, t.grad


def leaf(value, shape):
    return torch.full(shape, float(value), requires_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_one_element_parameters_are_the_scalar_ones(loss, backend, shape):
    """HF's SiglipModel and FSDP2 keep the temperature and bias as [1] tensors: the same
    loss and gradients as 0-dim ones, bit for bit, each gradient in its parameter's shape."""
    img, txt = testing.make_pairs(9, 8, seed=1)
    results = []
    for s in ((), shape):
        scale, bias = leaf(2.0, s), leaf(-3.0, s)
        out, di, dt = run(loss, img, txt, scale, bias, backend=backend)
        grads = [scale.grad] + ([bias.grad] if loss == "siglip" else [])
        assert all(g.shape == torch.Size(s) for g in grads)
        results.append([out.loss.detach(), di, dt, *(g.reshape(()) for g in grads)])
    for ours, scalar in zip(results[1], results[0], strict=True):
        assert torch.equal(ours, scalar)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_a_scale_whose_exp_overflows_is_refused_without_a_cap(loss):
    """exp(89) overflows fp32: with no cap the scale would be inf (it was silently held at
    exp(88), the loss inf and the temperature's gradient 0)."""
    img, txt = testing.make_pairs(8, 8, seed=2)
    with pytest.raises(ClipLossInputError, match="overflows fp32 above 88.72"):
        run(loss, img, txt, leaf(89.0, ()), leaf(-10.0, ()), logit_scale_max=math.inf)
    # With CLIP's cap the same parameter is simply capped, its gradient 0 (as in CLIP).
    out, _, _ = run(loss, img, txt, leaf(89.0, ()), leaf(-10.0, ()), logit_scale_max=100.0)
    assert float(out.logit_scale) == 100.0 and math.isfinite(float(out.loss_global))


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_a_scale_that_would_overflow_the_loss_is_refused(loss):
    """A finite scale so large that the loss's fp32 sums overflow is refused by name; one
    just below keeps a finite loss within its float64 bound."""
    img, txt = testing.make_pairs(8, 8, seed=3)
    with pytest.raises(ClipLossInputError, match="overflow fp32"):
        run(loss, img, txt, leaf(88.5, ()), leaf(-10.0, ()), logit_scale_max=math.inf)
    theta = 80.0  # s = 5.5e34
    out, _, _ = run(loss, img, txt, leaf(theta, ()), leaf(-10.0, ()), logit_scale_max=math.inf)
    if loss == "clip":
        exact = testing.clip_truth(img, txt, theta, logit_scale_max=math.inf)
    else:
        exact = testing.siglip_truth(img, txt, theta, -10.0, logit_scale_max=math.inf)
    testing.check_scalar("loss", out.loss_global, exact.loss, exact.loss_bound)


def test_siglip_does_not_cap_the_scale_by_default():
    """As SigLIP, HF's SiglipModel and open_clip's SigLipLoss: a scale of 200 is used as it
    is, and the temperature keeps its gradient."""
    img, txt = testing.make_pairs(10, 8, seed=4)
    theta = math.log(200.0)
    scale = leaf(theta, ())
    out, _, _ = run("siglip", img, txt, scale, leaf(-10.0, ()))
    assert float(out.logit_scale) == pytest.approx(200.0, rel=1e-6)
    exact = testing.siglip_truth(img, txt, theta, -10.0, logit_scale_max=math.inf)
    testing.check_scalar("d_scale", scale.grad, exact.d_scale, exact.d_scale_bound)
    assert palmtree.SigLipLoss().options.logit_scale_max == math.inf
    assert palmtree.ClipLoss().options.logit_scale_max == 100.0


# ----------------------------------------------------------------------- several ranks


@pytest.fixture(scope="module")
def pair():
    w = World(2)
    yield w
    w.close()


def mixed_shapes(rank, n, loss, backend):
    """Rank 0 holds [1]-shaped parameters, rank 1 0-dim ones (it hung: rank 0 crashed
    before the exchange)."""
    img, txt = testing.make_pairs(11, 8, seed=5)
    sizes = [6, 5]
    o, b = sum(sizes[:rank]), sizes[rank]
    shape = (1,) if rank == 0 else ()
    scale, bias = leaf(2.0, shape), leaf(-3.0, shape)
    out, di, dt = run(loss, img[o : o + b], txt[o : o + b], scale, bias, backend=backend)
    return float(out.loss_global), scale.grad.shape


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_ranks_with_differently_shaped_parameters_agree(pair, loss):
    results = pair.run(mixed_shapes, loss, "chunked")
    img, txt = testing.make_pairs(11, 8, seed=5)
    alone, _, _ = run(loss, img, txt, leaf(2.0, ()), leaf(-3.0, ()), backend="chunked")
    for rank, (value, shape) in enumerate(results):
        assert shape == torch.Size((1,) if rank == 0 else ())
        assert value == pytest.approx(float(alone.loss_global), rel=1e-6)


def crash_in_checks(rank, n):
    """Rank 1's mask is a sparse tensor, which the pooling cannot even compare: an error
    that no check foresaw, raised before the exchange."""
    img, txt = torch.randn(3, 8), torch.randn(3, 4, 8)
    mask = torch.ones(3, 4)
    if rank == 1:
        mask = mask.to_sparse()
    palmtree.clip_loss(img, txt, 2.0, text_mask=mask)


def test_an_unforeseen_error_on_one_rank_reaches_every_rank(pair):
    results = pair.run(crash_in_checks, expect_raise=True)
    assert {r.type for r in results} == {"ClipLossInputError"}
    assert len({r.message for r in results}) == 1
    assert results[0].message.startswith("rank 1: checking this rank's input failed")


def one_rank_alone(rank, n, loss):
    """Rank 0 evaluates alone while the group is up; rank 1 does not call the loss."""
    if rank != 0:
        return None
    img, txt = testing.make_pairs(7, 8, seed=6)
    fn = palmtree.ClipLoss() if loss == "clip" else palmtree.SigLipLoss()
    with torch.no_grad():
        out = fn(img, txt, distributed=False)
    functional = run(loss, img, txt, leaf(2.0, ()), leaf(-3.0, ()), distributed=False)[0]
    return out.loss_global, out.b_global, functional.loss_global


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_distributed_false_computes_on_this_process_alone(pair, loss):
    module_loss, b_global, functional = pair.run(one_rank_alone, loss)[0]
    img, txt = testing.make_pairs(7, 8, seed=6)
    fn = palmtree.ClipLoss() if loss == "clip" else palmtree.SigLipLoss()
    with torch.no_grad():
        assert torch.equal(module_loss, fn(img, txt).loss_global)
    assert torch.equal(
        functional, run(loss, img, txt, leaf(2.0, ()), leaf(-3.0, ()))[0].loss_global
    )
    assert b_global == 7


def late_rank(rank, n):
    """Rank 1 reaches the loss 3 s after rank 0: rank 0 says why it waits."""
    os.environ["PALMTREE_EXCHANGE_WARN_S"] = "0.5"
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("palmtree").addHandler(handler)
    try:
        if rank == 1:
            time.sleep(3.0)
        img, txt = testing.make_pairs(4, 8, seed=rank)
        palmtree.clip_loss(img, txt, 2.0)
    finally:
        logging.getLogger("palmtree").removeHandler(handler)
        del os.environ["PALMTREE_EXCHANGE_WARN_S"]
    return [r.getMessage() for r in records]


def test_a_rank_waiting_in_the_exchange_says_why(pair):
    first, late = pair.run(late_rank)
    assert late == []
    assert len(first) == 1
    assert "rank 0 of 2 has waited 0.5 s" in first[0]
    assert "every rank of the group must call the loss" in first[0]
    assert "distributed=False" in first[0]


def _left_alone(rank, port, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dist.barrier()  # every connection is up: what follows is a peer that left, not a slow start
    if rank == 1:
        os._exit(0)  # gone without a word, as a rank that finished its loop
    time.sleep(1.0)
    try:
        palmtree.clip_loss(torch.randn(3, 8), torch.randn(3, 8), 2.0)
        results.put("no error")
    except RuntimeError as exc:
        results.put(str(exc))
    results.close()
    results.join_thread()  # put() hands the message to a thread: let it reach the pipe
    os._exit(0)


def test_a_rank_whose_peer_has_exited_gets_the_reason():
    """Instead of gloo's bare 'Connection closed by peer': what the ranks must do."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_left_alone, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        message = results.get(timeout=120)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert "the loss's exchange failed on rank 0 of 2" in message
    assert "every rank of the group must call the loss" in message
