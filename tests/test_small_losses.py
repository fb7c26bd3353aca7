"""The temperature's and the bias's gradients keep their digits when the loss is small.

Aligned pairs at a large scale peak every softmax: the CLIP loss is 5e-6 at ``s = 20``,
6e-13 at 50 and 5e-24 at 99 (B = 12, D = 32), and ``d logit_scale`` is about the loss
times the gap between positive and negative logits. Summed as ``sum G * (U V^T)`` it
comes from terms of the size of the weights that cancel, keeping ``eps / loss`` relative
accuracy: 4e-3 at ``s = 20`` (plain autograd 1e-2), a wrong sign at 50. Every backend
instead measures each similarity against its row's and its column's positive
(``palmtree.backends.base``), so that those terms share a sign; the float64 truth is
formed the same way, and the bound (``palmtree.testing.clip_truth``) is that formation's
error analysis, relative to the value. Each backend is held to it in one process and on
gloo ranks whose columns' positives live on other ranks; the cancelling formation (plain
fp32 autograd) fails it. SigLIP's gradients have no such identity: the tests hold them to
their bound at small losses where the positives dominate and where the negatives do.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dist_cases import loss_and_grads
from world import World

from palmtree import clip_loss, siglip_loss, testing
from palmtree.backends import triton_available

BACKENDS = ["reference", "chunked"] + (["fused"] if triton_available() else [])
B, DIM = 12, 32
#: Temperatures and the float64 loss they give on the aligned pairs below.
SCALES = {20.0: 5e-6, 50.0: 7e-13, 99.0: 5e-24}
#: SigLIP at s = 99: bias -84 leaves the positives' terms (softplus(-15), 3e-7) dominant,
#: bias -60 the negatives' (every negative logit below -12).
SIGLIP_BIASES = (-84.0, -60.0)


def pairs(dim: int = DIM):
    return testing.make_pairs(B, dim, seed=0, kind="aligned")


def log_of(scale: float) -> float:
    """The fp32 log temperature: the truth is that of what the loss is given."""
    return float(torch.tensor(math.log(scale)))


def clip_grad(img, txt, log_scale, backend):
    theta = torch.tensor(log_scale, requires_grad=True)
    out = clip_loss(img.clone(), txt.clone(), theta, backend=backend, precision="ieee")
    out.loss.backward()
    return theta.grad


def relative(ours, exact) -> float:
    return testing.max_error(ours, exact) / abs(float(exact))


def test_the_truth_keeps_its_digits():
    """``testing.clip_truth``'s ``d_scale`` against float64 autograd of the loss written
    with every logit's difference to its positive taken before the scale: no sum that
    cancels anywhere. Formed as ``sum G * (U V^T)`` even float64 has nothing left of a
    loss of 5e-24 (its error, ~1e-16 of the weights, is 1e10 times the value)."""
    img, txt = pairs()
    u, v = F.normalize(img.double(), dim=1), F.normalize(txt.double(), dim=1)
    dot = u @ v.T
    eye = torch.eye(B, dtype=torch.bool)
    for scale, loss in SCALES.items():
        theta = torch.tensor(log_of(scale), dtype=torch.float64, requires_grad=True)
        terms = []
        for d in (dot, dot.T):  # rows (image -> text) and columns (text -> image)
            gaps = (theta.exp() * (d - d.diagonal()[:, None])).masked_fill(eye, -math.inf)
            terms.append(F.softplus(torch.logsumexp(gaps, dim=1)))
        total = torch.cat(terms).sum() / (2 * B)
        total.backward()
        exact = testing.clip_truth(img, txt, log_of(scale))
        assert float(exact.loss) == pytest.approx(total.item(), rel=1e-12)
        assert float(exact.loss) < loss
        assert relative(exact.d_scale, theta.grad) < 1e-12, (scale, exact.d_scale, theta.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", SCALES)
def test_the_temperature_gradient_keeps_its_digits(backend, scale):
    img, txt = pairs()
    exact = testing.clip_truth(img, txt, log_of(scale))
    assert float(exact.loss) < SCALES[scale]
    # The bound is relative to the value: the formation's, not an allowance for cancelling.
    assert exact.d_scale_bound < 1e-3 * abs(float(exact.d_scale))
    ours = clip_grad(img, txt, log_of(scale), backend)
    err = testing.check_scalar(f"{backend} d_scale", ours, exact.d_scale, exact.d_scale_bound)
    print(f"{backend} s={scale:g}: relative error {err / abs(float(exact.d_scale)):.1e}")


@pytest.mark.parametrize("scale", SCALES)
def test_the_cancelling_formation_fails_the_bound(scale):
    """The rule has teeth: plain fp32 autograd forms ``sum (P - I) * (U V^T)``, which
    cancels at a peaked softmax (relative error 1e-2 at s = 20, of order 1 beyond)."""
    img, txt = pairs()
    exact = testing.clip_truth(img, txt, log_of(scale))
    plain = testing.plain_fp32(img, txt, log_of(scale))
    with pytest.raises(AssertionError, match="d_scale: error"):
        testing.check_scalar("d_scale", plain["d_scale"], exact.d_scale, exact.d_scale_bound)
    assert relative(plain["d_scale"], exact.d_scale) > 1e-3


# ----------------------------------------------------------------------------- gloo ranks

SIZES = [5, 0, 7]  # an empty rank; every column's positive on another rank than most rows
WEIGHTS = [1.0, 0.5, 2.0]


@pytest.fixture(scope="module")
def world():
    w = World(len(SIZES))
    yield w
    w.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_gloo_ranks(world, backend):
    """Three ranks, uneven with an empty one, different upstream gradients: each rank
    measures its columns against positives that other ranks computed (they travel in the
    forward's SUM all-reduce). DDP's mean of the ranks' gradients is held to the bound."""
    img, txt = pairs()
    for scale in (20.0, 99.0):
        args = (backend, "ieee", SIZES, WEIGHTS, DIM, 0, log_of(scale))
        results = world.run(loss_and_grads, *args, kind="aligned")
        exact = testing.clip_truth(img, txt, log_of(scale), sizes=SIZES, weights=WEIGHTS)
        assert exact.d_scale_bound < 1e-3 * abs(float(exact.d_scale))
        d_scale = torch.stack([r["d_scale"].double() for r in results]).mean()
        label = f"{backend} s={scale:g} d_scale"
        testing.check_scalar(label, d_scale, exact.d_scale, exact.d_scale_bound)


@pytest.mark.parametrize("backend", BACKENDS)
def test_siglip_on_gloo_ranks(world, backend):
    img, txt = pairs()
    log_scale = log_of(99.0)
    for bias in SIGLIP_BIASES:
        args = (backend, "ieee", SIZES, WEIGHTS, DIM, 0, log_scale)
        results = world.run(loss_and_grads, *args, kind="aligned", bias=bias)
        exact = testing.siglip_truth(img, txt, log_scale, bias, sizes=SIZES, weights=WEIGHTS)
        for name in ("d_scale", "d_bias"):
            mean = torch.stack([r[name].double() for r in results]).mean()
            testing.check_scalar(
                f"{backend} bias {bias:g} {name}",
                mean,
                getattr(exact, name),
                getattr(exact, f"{name}_bound"),
            )


# ----------------------------------------------------------------------------- SigLIP


def siglip_grads(img, txt, log_scale, bias, backend):
    theta = torch.tensor(log_scale, requires_grad=True)
    b = torch.tensor(bias, requires_grad=True)
    out = siglip_loss(img.clone(), txt.clone(), theta, b, backend=backend, precision="ieee")
    out.loss.backward()
    return theta.grad, b.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", SIGLIP_BIASES)
def test_siglip_gradients_at_a_small_loss(backend, bias):
    """``dJ/ds = sum G (U V^T)`` and ``dJ/dbias = sum G`` are sums of mixed signs in the
    truth itself (positives' ``G < 0``, negatives' ``> 0``): any formation gets
    ``gamma(n) sum |terms|``, which is what the bound allows beyond each term's own
    error. Each term is formed to relative accuracy: a positive's ``G`` as
    ``-w sigmoid(-x)``, never ``w (sigmoid(x) - 1)``."""
    img, txt = pairs()
    exact = testing.siglip_truth(img, txt, log_of(99.0), bias)
    assert float(exact.loss) < 1e-6
    ours = siglip_grads(img, txt, log_of(99.0), bias, backend)
    for name, value in zip(("d_scale", "d_bias"), ours, strict=True):
        want, bound = getattr(exact, name), getattr(exact, f"{name}_bound")
        assert bound < 1e-3 * abs(float(want))  # relative to the value: nothing cancels
        testing.check_scalar(f"{backend} {name}", value, want, bound)


def test_siglip_positives_formed_as_one_minus_sigmoid_fail_the_bound():
    """The rule has teeth: where the positives dominate (bias -84), their ``G`` formed as
    ``w (sigmoid(x) - 1)`` in fp32 keeps ``eps`` of ``w`` where the truth is ``3e-7 w``."""
    img, txt = pairs()
    log_scale, bias = log_of(99.0), SIGLIP_BIASES[0]
    exact = testing.siglip_truth(img, txt, log_scale, bias)
    u, v = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    x = math.exp(log_scale) * (u @ v.T) + bias
    eye = torch.eye(B, dtype=torch.bool)
    g = torch.where(eye, torch.sigmoid(x) - 1, torch.sigmoid(x)) / B
    with pytest.raises(AssertionError, match="d_bias: error"):
        testing.check_scalar("d_bias", g.sum(), exact.d_bias, exact.d_bias_bound)
