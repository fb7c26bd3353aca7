"""``palmtree.compat.open_clip.ClipLoss`` against open_clip's own ``loss.py``, unchanged.

On spawned gloo ranks with equal splits, the drop-in gives the losses and gradients of
open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)`` whatever flags it is
given. The same run checks what the drop-in's docstring says about open_clip's other
flag combinations (which are exact, which are wrong and how), against float64.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from world import World

import palmtree.compat.open_clip as compat
from palmtree import ClipLossInputError, testing
from palmtree.bench.peers import PeerUnavailable, load_open_clip_loss_module
from palmtree.testing import make_pairs

try:
    load_open_clip_loss_module()
except PeerUnavailable as exc:  # pragma: no cover - open-clip-torch is a dev dependency
    pytest.skip(f"open_clip's loss.py is not available: {exc}", allow_module_level=True)

#: (local_loss, gather_with_grad), the correct combination first.
FLAGS = [(True, True), (False, True), (False, False), (True, False)]
LOG_SCALE = 2.659  # ln(1/0.07), CLIP's initial temperature
DIM = 16


def unit_batch(big, seed):
    """The features open_clip's models hand to the loss: already L2-normalised."""
    img, txt = make_pairs(big, DIM, seed)
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def truth(sizes, seed, log_scale=LOG_SCALE):
    """float64 loss, per-rank shares and gradients of the global loss: open_clip's setting
    (features already unit vectors, not normalised again; no cap on the scale)."""
    img, txt = unit_batch(sum(sizes), seed)
    ref = testing.clip_truth(
        img, txt, log_scale, sizes=sizes, logit_scale_max=math.inf, normalize=False
    )
    return {"shares": ref.shares, "d_img": ref.d_img, "d_txt": ref.d_txt, "d_scale": ref.d_scale}


def run_loss(loss_fn, rank, sizes, seed, **kw):
    img, txt = unit_batch(sum(sizes), seed)
    o, b = sum(sizes[:rank]), sizes[rank]
    i = img[o : o + b].clone().requires_grad_()
    t = txt[o : o + b].clone().requires_grad_()
    theta = torch.tensor(LOG_SCALE, requires_grad=True)
    loss = loss_fn(i, t, theta.exp(), **kw)
    if isinstance(loss, dict):
        loss = loss["contrastive_loss"]
    loss.backward()
    return {"loss": loss.detach(), "d_img": i.grad, "d_txt": t.grad, "d_scale": theta.grad}


def every_flag_combination(rank, n, sizes, seed):
    """open_clip and the drop-in with each flag combination; the drop-in twice (warn once)."""
    peer = load_open_clip_loss_module()
    compat._WARNED.clear()
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for flags in FLAGS:
            kw = dict(local_loss=flags[0], gather_with_grad=flags[1], rank=rank, world_size=n)
            out["open_clip", flags] = run_loss(peer.ClipLoss(**kw), rank, sizes, seed)
            ours = compat.ClipLoss(**kw, backend="chunked", precision="ieee")
            out["palmtree", flags] = run_loss(ours, rank, sizes, seed)
            out["palmtree", flags, "dict"] = run_loss(ours, rank, sizes, seed, output_dict=True)
            out["global", flags] = float(ours.last_output.loss_global)
    out["warnings"] = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return out


def drop_in_only(rank, n, sizes, seed, backend):
    ours = compat.ClipLoss(local_loss=True, gather_with_grad=True, backend=backend)
    return run_loss(ours, rank, sizes, seed)


def mismatched_world(rank, n):
    img, txt = unit_batch(2 * n, 1)
    bad = compat.ClipLoss(rank=rank, world_size=n + 1) if rank == n - 1 else compat.ClipLoss()
    bad(img[2 * rank : 2 * rank + 2], txt[2 * rank : 2 * rank + 2], torch.tensor(10.0))


def effective(per_rank):
    """What DDP hands the parameters: features' gradients / N, the scale's mean over ranks."""
    n = len(per_rank)
    d_img = torch.cat([r["d_img"] for r in per_rank]) / n
    d_txt = torch.cat([r["d_txt"] for r in per_rank]) / n
    d_scale = torch.stack([r["d_scale"] for r in per_rank]).mean()
    return d_img, d_txt, d_scale


def rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"N{n}")
def world(request):
    w = World(request.param)
    yield w
    w.close()


def test_equals_open_clip_and_documents_its_flags(world):
    n = world.size
    sizes = [6] * n
    results = world.run(every_flag_combination, sizes, 11)
    exact = truth(sizes, 11)
    right = ("open_clip", (True, True))

    for flags in FLAGS:
        for key in (("palmtree", flags), ("palmtree", flags, "dict")):
            # Every flag combination gives open_clip's correct result, rank by rank.
            for rank, r in enumerate(results):
                ours, peer = r[key], r[right]
                torch.testing.assert_close(ours["loss"], peer["loss"], rtol=2e-6, atol=1e-6)
                assert rel(ours["d_img"], peer["d_img"]) < 1e-5
                assert rel(ours["d_txt"], peer["d_txt"]) < 1e-5
                assert float(ours["loss"]) == pytest.approx(
                    n * float(exact["shares"][rank]), rel=1e-5
                )
            # Each rank's scale gradient is its own part of a different split of the same
            # sum: the mean over ranks, which DDP applies, is what must agree.
            ours_scale = effective([r[key] for r in results])[2]
            peer_scale = effective([r[right] for r in results])[2]
            torch.testing.assert_close(ours_scale, peer_scale, rtol=1e-5, atol=1e-7)
            assert results[0]["global", flags] == pytest.approx(float(exact["shares"].sum()), 1e-5)

    # The docstring's account of open_clip's flags, checked on open_clip itself.
    for flags in FLAGS:
        d_img, d_txt, d_scale = effective([r["open_clip", flags] for r in results])
        assert float(d_scale) == pytest.approx(float(exact["d_scale"]), rel=1e-4)  # always exact
        if flags[1]:  # gather_with_grad: exact
            assert rel(d_img, exact["d_img"]) < 1e-5 and rel(d_txt, exact["d_txt"]) < 1e-5
        elif not flags[0]:  # neither: the towers get 1/N of the gradient
            assert rel(n * d_img, exact["d_img"]) < 1e-5
            assert rel(n * d_txt, exact["d_txt"]) < 1e-5
        else:  # local loss without gradient through the gather: not even proportional
            for got, want in ((d_img, exact["d_img"]), (d_txt, exact["d_txt"])):
                got, want = got.double().flatten(), want.flatten()
                fit = (got @ want) / (want @ want)
                assert float((got - fit * want).norm() / got.norm()) > 0.05
    peer_local = [float(r["open_clip", (False, False)]["loss"]) for r in results]
    assert peer_local == pytest.approx([float(exact["shares"].sum())] * n, rel=1e-5)

    # One warning per wrong combination and process, however many forwards.
    for r in results:
        assert len(r["warnings"]) == 2, r["warnings"]
        assert "local_loss=False, gather_with_grad=False" in r["warnings"][0]
        assert "1/world_size" in r["warnings"][0]
        assert "local_loss=True, gather_with_grad=False" in r["warnings"][1]


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_uneven_splits_are_exact(world, backend):
    """What open_clip cannot do: ranks of different sizes, one of them empty on 3 ranks."""
    n = world.size
    sizes = [3, 6] if n == 2 else [4, 0, 5]
    results = world.run(drop_in_only, sizes, 5, backend)
    exact = truth(sizes, 5)
    for r, res in enumerate(results):
        assert float(res["loss"]) == pytest.approx(
            n * float(exact["shares"][r]), rel=1e-5, abs=1e-6
        )
    d_img, d_txt, d_scale = effective(results)
    assert rel(d_img, exact["d_img"]) < 1e-5 and rel(d_txt, exact["d_txt"]) < 1e-5
    assert float(d_scale) == pytest.approx(float(exact["d_scale"]), rel=1e-4)


def test_world_mismatch_raises_on_every_rank(world):
    n = world.size
    for r in world.run(mismatched_world, expect_raise=True):
        assert r.type == "ClipLossInputError", r
        assert f"rank {n - 1}: ClipLoss(world_size={n + 1})" in r.message


def test_single_process_matches_open_clip_for_every_flag():
    peer = load_open_clip_loss_module()
    want = run_loss(peer.ClipLoss(), 0, [9], 3)
    for local_loss, gather_with_grad in FLAGS:
        ours = compat.ClipLoss(
            local_loss, gather_with_grad, cache_labels=True, rank=0, world_size=1
        )
        got = run_loss(ours, 0, [9], 3)
        torch.testing.assert_close(got["loss"], want["loss"], rtol=2e-6, atol=1e-6)
        for k in ("d_img", "d_txt"):
            assert rel(got[k], want[k]) < 1e-5
        torch.testing.assert_close(got["d_scale"], want["d_scale"], rtol=1e-5, atol=1e-7)


def test_open_clip_output_structure_and_scale_as_float():
    img, txt = unit_batch(5, 2)
    out = compat.ClipLoss()(img, txt, 14.0, output_dict=True)
    assert set(out) == {"contrastive_loss"} and out["contrastive_loss"].dim() == 0
    peer = load_open_clip_loss_module().ClipLoss()(img, txt, torch.tensor(14.0))
    torch.testing.assert_close(out["contrastive_loss"], peer, rtol=2e-6, atol=1e-6)


def test_no_cap_on_the_exponentiated_scale():
    """open_clip's loss does not clamp: at scale 300 the gradient still flows."""
    peer = load_open_clip_loss_module().ClipLoss()
    img, txt = unit_batch(7, 4)
    scales = [torch.tensor(300.0, requires_grad=True) for _ in range(2)]
    a, b = compat.ClipLoss()(img, txt, scales[0]), peer(img, txt, scales[1])
    (a + b).backward()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert float(scales[0].grad) != 0.0
    torch.testing.assert_close(scales[0].grad, scales[1].grad, rtol=1e-4, atol=1e-7)


def test_unsupported_arguments_say_why():
    img, txt = unit_batch(4, 1)
    with pytest.raises(ClipLossInputError, match="SigLIP"):
        compat.ClipLoss()(img, txt, torch.tensor(10.0), logit_bias=torch.tensor(-10.0))
    with pytest.raises(ClipLossInputError, match="world_size=8"):
        compat.ClipLoss(rank=0, world_size=8)(img, txt, torch.tensor(10.0))
    with pytest.raises(ValueError, match="horovod"):
        compat.ClipLoss(use_horovod=True)


def test_no_warning_on_one_rank():
    compat._WARNED.clear()
    img, txt = unit_batch(4, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.ClipLoss(local_loss=True)(img, txt, torch.tensor(10.0))
    assert compat.wrong_flags_reason(True, False, 1) is None
    assert compat.wrong_flags_reason(False, True, 4) is None
    assert "1/world_size" in compat.wrong_flags_reason(False, False, 4)


# --- SigLipLoss --------------------------------------------------------------------------

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
LOG_BIAS = -10.0


def run_siglip(loss_fn, rank, sizes, seed):
    """One rank's (loss, gradients) through an open_clip-style ``SigLipLoss``."""
    img, txt = unit_batch(sum(sizes), seed)
    o, b = sum(sizes[:rank]), sizes[rank]
    i = img[o : o + b].clone().requires_grad_()
    t = txt[o : o + b].clone().requires_grad_()
    theta = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(LOG_BIAS, requires_grad=True)
    loss = loss_fn(i, t, theta.exp(), bias)
    loss.backward()
    return {
        "loss": loss.detach(),
        "d_img": i.grad,
        "d_txt": t.grad,
        "d_scale": theta.grad,
        "d_bias": bias.grad,
    }


def siglip_every_dist_impl(rank, n, sizes, seed):
    peer = load_open_clip_loss_module()
    out = {}
    for impl in DIST_IMPLS:
        kw = dict(rank=rank, world_size=n, dist_impl=impl)
        out["open_clip", impl] = run_siglip(peer.SigLipLoss(**kw), rank, sizes, seed)
        ours = compat.SigLipLoss(**kw, backend="chunked", precision="ieee")
        out["palmtree", impl] = run_siglip(ours, rank, sizes, seed)
    return out


def siglip_uneven(rank, n, sizes, seed, backend):
    ours = compat.SigLipLoss(rank=rank, world_size=n, backend=backend, precision="ieee")
    return run_siglip(ours, rank, sizes, seed)


def test_siglip_equals_open_clip_for_every_dist_impl(world):
    n = world.size
    results = world.run(siglip_every_dist_impl, [6] * n, 13)
    for impl in DIST_IMPLS:
        for r in results:
            ours, peer = r["palmtree", impl], r["open_clip", impl]
            torch.testing.assert_close(ours["loss"], peer["loss"], rtol=2e-6, atol=1e-6)
            for k in ("d_img", "d_txt"):
                assert rel(ours[k], peer[k]) < 1e-5, (impl, k)
            for k in ("d_scale", "d_bias"):
                torch.testing.assert_close(ours[k], peer[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_siglip_uneven_splits_are_exact(world, backend):
    """What open_clip's ring cannot do: ranks of different sizes, one empty on 3 ranks."""
    n = world.size
    sizes = [3, 6] if n == 2 else [4, 0, 5]
    results = world.run(siglip_uneven, sizes, 5, backend)
    img, txt = unit_batch(sum(sizes), 5)
    exact = testing.siglip_truth(
        img,
        txt,
        math.log(10.0),
        LOG_BIAS,
        sizes=sizes,
        logit_scale_max=math.inf,
        normalize=False,
    )
    for r, res in enumerate(results):
        want, bound = n * exact.shares[r], n * float(exact.share_bounds[r])
        testing.check_scalar(f"loss on rank {r}", res["loss"], want, bound)
    d_img, d_txt, d_scale = effective(results)
    assert rel(d_img, exact.d_img) < 1e-5 and rel(d_txt, exact.d_txt) < 1e-5
    testing.check_scalar("d_scale", d_scale, exact.d_scale, exact.d_scale_bound)
    d_bias = torch.stack([res["d_bias"].double() for res in results]).mean()
    testing.check_scalar("d_bias", d_bias, exact.d_bias, exact.d_bias_bound)


def test_siglip_default_world_is_one_process():
    """open_clip's defaults (rank 0 of 1) work in one process, as open_clip's do."""
    peer = load_open_clip_loss_module().SigLipLoss()
    want = run_siglip(peer, 0, [7], 2)
    got = run_siglip(compat.SigLipLoss(), 0, [7], 2)
    torch.testing.assert_close(got["loss"], want["loss"], rtol=2e-6, atol=1e-6)
    with pytest.raises(ValueError, match="dist_impl"):
        compat.SigLipLoss(dist_impl="ring")
