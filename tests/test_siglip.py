"""The sigmoid (SigLIP) loss in one process, against float64: every backend, precision,
fused plan, the extremes of scale and bias, and its API and errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import palmtree
from palmtree import SigLipLoss, siglip_loss, testing
from palmtree.backends import fused_can_run
from palmtree.testing import make_pairs

FUSED_HERE = fused_can_run(torch.device("cpu"))
BACKENDS = ["reference", "chunked"] + (["fused"] if FUSED_HERE else [])
FUSED_PLANS = {
    "default": {},
    # D in 16-wide chunks, split columns, the atomic dV: the other paths, on small sizes.
    "split": dict(block_k=16, target_programs=12),
    "atomic": dict(bwd_mode="atomic"),
}


def run(img, txt, log_scale, bias, **kw):
    i = img.clone().requires_grad_()
    t = txt.clone().requires_grad_()
    theta = torch.tensor(float(log_scale), device=img.device, requires_grad=True)
    b = torch.tensor(float(bias), device=img.device, requires_grad=True)
    out = siglip_loss(i, t, theta, b, **kw)
    out.loss.backward()
    grads = {"d_img": i.grad, "d_txt": t.grad, "d_scale": theta.grad, "d_bias": b.grad}
    return out, grads


def check(out, grads, img, txt, log_scale, bias, precision="ieee"):
    """Sums within their derived bounds, gradient tensors within 2x plain fp32 autograd
    (the worst of four feature orders)."""
    exact = testing.siglip_truth(img, txt, log_scale, bias, precision=precision)
    for name, ours, want, bound in (
        ("loss", out.loss, exact.loss, exact.loss_bound),
        ("loss_global", out.loss_global, exact.loss, exact.loss_bound),
        ("loss_pos", out.loss_pos, exact.loss_pos, exact.pos_bound),
        ("loss_neg", out.loss_neg, exact.loss_neg, exact.neg_bound),
        ("d_scale", grads["d_scale"], exact.d_scale, exact.d_scale_bound),
        ("d_bias", grads["d_bias"], exact.d_bias, exact.d_bias_bound),
    ):
        testing.check_scalar(name, ours, want, bound)
    if precision != "ieee":
        return exact
    plain = testing.worst_of_orders(
        lambda i, t: testing.plain_fp32_siglip(i, t, log_scale, bias), img, txt, vars(exact)
    )
    for name in ("d_img", "d_txt"):
        testing.check_tensor(name, grads[name], plain[name], getattr(exact, name))
    return exact


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("big,dim,chunk", [(1, 5, None), (37, 24, 7), (67, 40, 16)])
def test_matches_float64(backend, big, dim, chunk):
    img, txt = make_pairs(big, dim, seed=big)
    out, grads = run(
        img, txt, math.log(10.0), -10.0, backend=backend, chunk_size=chunk, precision="ieee"
    )
    check(out, grads, img, txt, math.log(10.0), -10.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["aligned", "adversarial"])
@pytest.mark.parametrize("bias", [-10.0, 10.0])
def test_extremes_of_scale_and_bias(backend, kind, bias):
    """s = 100 with every similarity near +1 (aligned pairs) or near -1 (adversarial,
    duplicated pairs), bias -10 and +10: logits of +-110, no overflow anywhere."""
    img, txt = make_pairs(40, 16, seed=3, kind=kind)
    out, grads = run(img, txt, math.log(100.0), bias, backend=backend, precision="ieee")
    assert all(torch.isfinite(g).all() for g in grads.values())
    check(out, grads, img, txt, math.log(100.0), bias)


@pytest.mark.skipif(not FUSED_HERE, reason="needs Triton (its interpreter on a CPU)")
@pytest.mark.parametrize("plan", FUSED_PLANS)
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
def test_fused_plans_and_precisions(plan, precision, monkeypatch):
    from palmtree.backends import fused

    overrides = FUSED_PLANS[plan]
    original = fused.FusedKernels.plan
    monkeypatch.setattr(
        fused.FusedKernels,
        "plan",
        lambda self, *a: dataclasses.replace(original(self, *a), **overrides),
    )
    img, txt = make_pairs(67, 40, seed=5)
    out, grads = run(img, txt, math.log(30.0), -5.0, backend="fused", precision=precision)
    check(out, grads, img, txt, math.log(30.0), -5.0, precision)
    if precision != "ieee":  # rounded operands: as good as chunked with the same rounding
        _, want = run(img, txt, math.log(30.0), -5.0, backend="chunked", precision=precision)
        exact = testing.siglip_truth(img, txt, math.log(30.0), -5.0)
        for name in ("d_img", "d_txt"):
            testing.check_tensor(name, grads[name], want[name], getattr(exact, name))


@pytest.mark.skipif(not FUSED_HERE, reason="needs Triton (its interpreter on a CPU)")
def test_fused_empty_rank_statistics():
    from palmtree.backends.fused import FusedKernels

    u, v = torch.empty(0, 8), torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    one = torch.tensor(1.0)
    stats = FusedKernels().sigmoid_forward(u, v, one, one, 0, "ieee", None)
    assert float(stats.pos_sum) == float(stats.neg_sum) == 0.0
    assert torch.equal(stats.col_max, torch.full((5,), -math.inf))
    du, dv, ds, db = FusedKernels().sigmoid_backward(u, v, one, one, 0, "ieee", None, u[:, 0])
    assert du.shape == (0, 8) and torch.equal(dv, torch.zeros(5, 8)) and float(db) == 0.0


def test_metrics_and_the_two_parts():
    g = torch.Generator().manual_seed(8)
    img = torch.randn(10, 12, generator=g)
    txt = img.clone()
    txt[3], txt[7] = img[7], img[3]  # two swapped captions: 8/10 right both ways
    out = siglip_loss(img, txt, math.log(10.0), -10.0)
    assert float(out.acc_i2t) == pytest.approx(0.8) and float(out.acc_t2i) == pytest.approx(0.8)
    assert float(out.loss_pos + out.loss_neg) == pytest.approx(float(out.loss_global))
    m = out.metrics()
    assert m["loss"] == float(out.loss_global)  # the global loss, not this rank's value
    assert m["logit_scale"] == pytest.approx(10.0) and m["logit_bias"] == -10.0
    assert m["b_local"] == m["b_global"] == 10


def test_module_owns_scale_bias_and_projections():
    loss_fn = SigLipLoss(image_dim=10, text_dim=7, embed_dim=8)
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(10.0))
    assert loss_fn.logit_bias.item() == -10.0
    out = loss_fn(torch.randn(6, 10), torch.randn(6, 4, 7), text_mask=torch.ones(6, 4))
    out.loss.backward()
    for p in loss_fn.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert "embed_dim=8" in repr(loss_fn)


@pytest.mark.parametrize(
    "bias,message",
    [
        (None, "logit_bias is required"),
        (torch.ones(2), "logit_bias must hold one value"),
        (torch.tensor(float("nan")), "non-finite values .* logit_bias"),
        ("high", "logit_bias must be a tensor or a number"),
    ],
)
def test_bad_bias_is_a_clear_error(bias, message):
    x = torch.randn(3, 4)
    with pytest.raises(palmtree.ClipLossInputError, match=message):
        siglip_loss(x, x, 1.0, bias)


def test_double_backward_is_refused_by_chunked():
    img, txt = make_pairs(8, 4, seed=13)
    layer = torch.nn.Linear(4, 4)
    out = siglip_loss(layer(img), txt, 2.0, -1.0, backend="chunked")
    with pytest.raises(RuntimeError, match="backend='reference'"):
        torch.autograd.grad(out.loss, layer.weight, create_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled kernels)")
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("bias", [-10.0, 10.0])
def test_fused_at_training_size_on_cuda(precision, bias):
    """B = 4096, D = 512 at the cap: sums within their bounds, gradient tensors within 2x
    chunked's error with the same operand rounding."""
    img, txt = make_pairs(4096, 512, seed=21)
    img, txt = img.cuda(), txt.cuda()
    runs = {
        b: run(img, txt, math.log(100.0), bias, backend=b, precision=precision)
        for b in ("fused", "chunked")
    }
    exact = testing.siglip_truth(img, txt, math.log(100.0), bias, precision=precision)
    out, grads = runs["fused"]
    testing.check_scalar("loss", out.loss, exact.loss, exact.loss_bound)
    testing.check_scalar("d_scale", grads["d_scale"], exact.d_scale, exact.d_scale_bound)
    testing.check_scalar("d_bias", grads["d_bias"], exact.d_bias, exact.d_bias_bound)
    for name in ("d_img", "d_txt"):
        testing.check_tensor(name, grads[name], runs["chunked"][1][name], getattr(exact, name))


@pytest.mark.skipif(not FUSED_HERE, reason="needs Triton (its interpreter on a CPU)")
def test_auto_falls_back_to_chunked_when_triton_fails(monkeypatch):
    """Simulated, as for the CLIP loss: auto picks fused and its sigmoid kernels fail."""
    from palmtree.backends import FusedOrChunked
    from palmtree.backends.fused import FusedKernels

    def broken(self, *args):
        raise RuntimeError("ptxas fatal: simulated failure")

    monkeypatch.setattr(palmtree.backends, "_fused_by_default", lambda device: True)
    monkeypatch.setattr(FusedKernels, "sigmoid_forward", broken)
    monkeypatch.setattr(FusedOrChunked, "failure", None)
    img, txt = make_pairs(12, 8, seed=14)
    with pytest.warns(RuntimeWarning, match="simulated failure"):
        out, grads = run(img, txt, math.log(10.0), -10.0, backend="auto")
    want, want_grads = run(img, txt, math.log(10.0), -10.0, backend="chunked")
    assert float(out.loss.detach()) == float(want.loss.detach())
    assert torch.equal(grads["d_img"], want_grads["d_img"])
