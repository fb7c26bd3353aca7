"""Single-process numerics, API and errors of clip_loss / ClipLoss, against float64."""

from __future__ import annotations

import math

import pytest
import torch

import palmtree
from palmtree import ClipLoss, ClipLossInputError, clip_loss, masked_mean_pool, testing
from palmtree.backends import resolve_backend
from palmtree.testing import make_pairs, max_error

BACKENDS = ["reference", "chunked"]
EPS32 = torch.finfo(torch.float32).eps
LOG_10 = math.log(10.0)


def run(img, txt, log_scale=LOG_10, **kw):
    i = img.clone().requires_grad_()
    t = txt.clone().requires_grad_()
    ls = torch.tensor(float(log_scale), requires_grad=True)
    out = clip_loss(i, t, ls, **kw)
    out.loss.backward()
    out.loss = out.loss.detach()
    return out, i.grad, t.grad, ls.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("big,dim,chunk", [(1, 5, None), (67, 40, 16), (130, 24, 7)])
def test_matches_float64(backend, big, dim, chunk):
    img, txt = make_pairs(big, dim, seed=big)
    exact = testing.clip_truth(img, txt, LOG_10)
    plain = testing.plain_fp32(img, txt, LOG_10)
    out, di, dt, ds = run(img, txt, backend=backend, precision="ieee", chunk_size=chunk)
    testing.check_scalar("loss", out.loss, exact.loss, exact.loss_bound)
    testing.check_tensor("d_img", di, plain["d_img"], exact.d_img)
    testing.check_tensor("d_txt", dt, plain["d_txt"], exact.d_txt)
    testing.check_scalar("d_scale", ds, exact.d_scale, exact.d_scale_bound)
    assert float(out.loss_global) == pytest.approx(float(out.loss.detach()), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log_scale", [math.log(30.0), math.log(100.0)])
def test_a_small_loss_keeps_its_digits(backend, log_scale):
    """A peaked softmax at a large scale: a loss far below 1e-3 is held to a bound
    relative to itself (no ``eps * scale`` allowance), for the loss and both halves."""
    img, txt = make_pairs(64, 24, seed=4, kind="aligned")
    exact = testing.clip_truth(img, txt, log_scale)
    assert float(exact.loss) < 1e-3
    out = run(img, txt, log_scale, backend=backend, precision="ieee")[0]
    testing.check_scalar("loss", out.loss, exact.loss, exact.loss_bound)
    testing.check_scalar("loss_global", out.loss_global, exact.loss, exact.loss_bound)
    halves = (out.loss_i2t, exact.loss_i2t), (out.loss_t2i, exact.loss_t2i)
    for ours, want in halves:
        testing.check_scalar("loss_i2t/t2i", ours, want, 2 * exact.loss_bound)


def test_the_loss_bound_catches_an_lse_that_cancels():
    """The rule has teeth: ``(max + log(sum)) - positive`` in fp32 fails it."""
    img, txt = make_pairs(64, 24, seed=4, kind="aligned")
    exact = testing.clip_truth(img, txt, math.log(30.0))
    u = torch.nn.functional.normalize(img, dim=1)
    v = torch.nn.functional.normalize(txt, dim=1)
    s = 30.0 * u @ v.T
    rows = (s.amax(1) + torch.log(torch.exp(s - s.amax(1, keepdim=True)).sum(1))) - s.diag()
    cols = (s.amax(0) + torch.log(torch.exp(s - s.amax(0)).sum(0))) - s.diag()
    cancelling = (rows.sum() + cols.sum()) / (2 * 64)
    with pytest.raises(AssertionError, match="loss: error"):
        testing.check_scalar("loss", cancelling, exact.loss, exact.loss_bound)


def test_chunk_size_does_not_change_the_result():
    img, txt = make_pairs(50, 16, seed=1)
    base = run(img, txt, backend="chunked", chunk_size=50)
    for chunk in (1, 7, 49, 1000):
        other = run(img, txt, backend="chunked", chunk_size=chunk)
        assert float(other[0].loss.detach()) == pytest.approx(
            float(base[0].loss.detach()), rel=1e-6
        )
        assert max_error(other[1], base[1]) <= 1e-6 * float(base[1].abs().max())


@pytest.mark.parametrize("precision,unit", [("tf32", 2.0**-11), ("bf16", 2.0**-8)])
def test_reduced_precision_is_as_good_as_plain_pytorch(precision, unit):
    """chunked vs float64: sums within the bound for rounded operands, gradient tensors
    no worse than the same operand rounding done by plain autograd."""
    img, txt = make_pairs(96, 64, seed=2)
    exact = testing.clip_truth(img, txt, LOG_10, precision=precision)
    ref = run(img, txt, backend="reference", precision=precision)
    ours = run(img, txt, backend="chunked", precision=precision, chunk_size=32)
    # chunked also rounds G to the operand precision before its products (as a GPU
    # kernel does), autograd does not: the allowance is that rounding's share.
    for k, name in ((1, "d_img"), (2, "d_txt")):
        testing.check_tensor(name, ours[k], ref[k], getattr(exact, name), rel=unit / 16)
    testing.check_scalar("d_scale", ours[3], exact.d_scale, exact.d_scale_bound)
    testing.check_scalar("loss", ours[0].loss, exact.loss, exact.loss_bound)
    # The operands really are rounded: the error is of the order of the unit roundoff.
    assert max_error(ours[0].loss, exact.loss) > EPS32 * float(exact.loss)


def test_default_precision_follows_torch_setting():
    img, txt = make_pairs(40, 16, seed=3)
    old = torch.get_float32_matmul_precision()
    try:
        for setting, mode in (("highest", "ieee"), ("high", "tf32"), ("medium", "bf16")):
            torch.set_float32_matmul_precision(setting)
            implicit = run(img, txt, backend="chunked")[0].loss
            explicit = run(img, txt, backend="chunked", precision=mode)[0].loss
            assert float(implicit) == float(explicit), setting
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_latents_are_mask_pooled(backend):
    g = torch.Generator().manual_seed(4)
    tokens = torch.randn(9, 6, 16, generator=g)
    mask = torch.ones(9, 6, dtype=torch.long)
    mask[0, 3:] = 0
    mask[5, 1:] = 0
    tokens[0, 3:] = 1e3  # padding must not leak into the mean
    img = torch.randn(9, 16, generator=g)
    pooled = torch.stack([tokens[i][mask[i].bool()].mean(0) for i in range(9)])
    a = clip_loss(img, tokens, torch.tensor(2.0), text_mask=mask, backend=backend)
    b = clip_loss(img, pooled, torch.tensor(2.0), backend=backend)
    assert float(a.loss.detach()) == pytest.approx(float(b.loss.detach()), rel=1e-6)


def test_masked_mean_pool():
    x = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 1, 0]])
    out = masked_mean_pool(x, mask)
    torch.testing.assert_close(out[0], x[0, :2].mean(0))
    torch.testing.assert_close(out[1], x[1, 1])
    assert masked_mean_pool(x.bfloat16(), mask.bool()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"no real token in row\(s\) 1"):
        masked_mean_pool(x, torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="does not match"):
        masked_mean_pool(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="only 0 and 1"):
        masked_mean_pool(x, torch.full((2, 3), 0.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs_give_the_loss_of_their_fp32_values(backend):
    """Also with backward() called inside the autocast region."""
    img, txt = make_pairs(48, 32, seed=5)
    img16, txt16 = img.bfloat16(), txt.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, di, dt, _ = run(img16, txt16, backend=backend, precision="ieee")
    ref, ri, rt, _ = run(img16.float(), txt16.float(), backend=backend, precision="ieee")
    assert out.loss.dtype == torch.float32
    assert float(out.loss.detach()) == float(ref.loss.detach())
    assert di.dtype == dt.dtype == torch.bfloat16
    torch.testing.assert_close(di, ri.bfloat16())


def test_autocast_does_not_reach_the_logits():
    img, txt = make_pairs(32, 16, seed=6)
    plain = run(img, txt, backend="reference", precision="ieee")[0].loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = run(img, txt, backend="reference", precision="ieee")[0].loss
    assert float(auto) == float(plain)


def test_scale_cap_modes():
    img, txt = make_pairs(16, 8, seed=7)
    above = math.log(100.0) + 0.3
    clamp = run(img, txt, above, scale_cap="clamp")
    st = run(img, txt, above, scale_cap="straight_through")
    assert float(clamp[0].logit_scale) == float(st[0].logit_scale) == pytest.approx(100.0)
    assert float(clamp[0].loss.detach()) == float(st[0].loss.detach())
    assert float(clamp[3]) == 0.0
    # straight-through: d/dtheta = exp(theta) * dL/ds with s evaluated at the cap
    s = torch.tensor(100.0, requires_grad=True)
    u = torch.nn.functional.normalize(img, dim=-1)
    v = torch.nn.functional.normalize(txt, dim=-1)
    labels = torch.arange(16)
    logits = s * u @ v.T
    loss = (
        torch.nn.functional.cross_entropy(logits, labels)
        + torch.nn.functional.cross_entropy(logits.T, labels)
    ) / 2
    loss.backward()
    assert float(st[3]) == pytest.approx(math.exp(above) * float(s.grad), rel=1e-4)
    below = math.log(20.0)
    assert float(run(img, txt, below, scale_cap="clamp")[3]) == pytest.approx(
        float(run(img, txt, below, scale_cap="straight_through")[3]), rel=1e-6
    )


def test_metrics():
    g = torch.Generator().manual_seed(8)
    img = torch.randn(10, 12, generator=g)
    txt = img.clone()
    txt[3], txt[7] = img[7], img[3]  # two swapped captions: 8/10 right both ways
    out = clip_loss(img, txt, torch.tensor(LOG_10))
    assert float(out.acc_i2t) == pytest.approx(0.8)
    assert float(out.acc_t2i) == pytest.approx(0.8)
    exact = testing.clip_truth(img, txt, LOG_10)
    testing.check_scalar("loss_global", out.loss_global, exact.loss, exact.loss_bound)
    assert float((out.loss_i2t + out.loss_t2i) / 2) == pytest.approx(float(out.loss_global))
    m = out.metrics()
    assert m["b_local"] == m["b_global"] == 10 and m["logit_scale"] == pytest.approx(10.0)


def test_normalize_false_takes_features_as_given():
    img, txt = make_pairs(20, 8, seed=9)
    u = torch.nn.functional.normalize(img, dim=-1)
    v = torch.nn.functional.normalize(txt, dim=-1)
    a = clip_loss(u, v, torch.tensor(2.0), normalize=False)
    b = clip_loss(img, txt, torch.tensor(2.0))
    assert float(a.loss.detach()) == pytest.approx(float(b.loss.detach()), rel=1e-6)
    c = clip_loss(img, txt, torch.tensor(2.0), normalize=False)
    logits = math.exp(2.0) * img.double() @ txt.double().T
    labels = torch.arange(20)
    expected = (
        torch.nn.functional.cross_entropy(logits, labels)
        + torch.nn.functional.cross_entropy(logits.T, labels)
    ) / 2
    assert float(c.loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_clip_loss_module_projects_and_learns_the_scale():
    loss_fn = ClipLoss(image_dim=10, text_dim=7, embed_dim=8)
    assert loss_fn.image_proj is not None and loss_fn.text_proj is not None
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    tokens = torch.randn(6, 4, 7)
    out = loss_fn(torch.randn(6, 10), tokens, text_mask=torch.ones(6, 4))
    out.loss.backward()
    for p in loss_fn.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    same = ClipLoss(image_dim=8, text_dim=8)
    assert same.image_proj is None and same.text_proj is None
    assert "embed_dim=8" in repr(same)


def test_dim_mismatch_errors_name_both_dims():
    with pytest.raises(ValueError, match="image_dim=10 and text_dim=7 differ"):
        ClipLoss(image_dim=10, text_dim=7)
    with pytest.raises(ClipLossInputError, match="image feature dim 8 != text feature dim 5"):
        clip_loss(torch.randn(3, 8), torch.randn(3, 5), torch.tensor(1.0))
    with pytest.raises(ClipLossInputError, match="text_features have dim 9 .* text_dim=7"):
        ClipLoss(image_dim=10, text_dim=7, embed_dim=8)(torch.randn(3, 10), torch.randn(3, 9))


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        ((torch.randn(3, 4), torch.randn(2, 4)), {}, "3 images but 2 texts"),
        ((torch.randn(3, 4), torch.randn(3, 2, 4)), {}, "text_mask is None"),
        ((torch.randn(3, 4), torch.randn(3, 4)), {"text_mask": torch.ones(3, 2)}, "already pooled"),
        ((torch.randn(3), torch.randn(3, 4)), {}, r"image_features must be \[b, D\]"),
        ((torch.ones(3, 4, dtype=torch.long), torch.randn(3, 4)), {}, "floating-point"),
        ((torch.randn(3, 4), torch.full((3, 4), float("inf"))), {}, "non-finite .* text_features"),
        ((torch.randn(3, 4), torch.randn(3, 4)), {"logit_scale": torch.ones(2)}, "one value"),
        ((torch.randn(0, 4), torch.randn(0, 4)), {}, "global batch is empty"),
    ],
)
def test_bad_input_is_a_clear_error(args, kwargs, message):
    scale = kwargs.pop("logit_scale", torch.tensor(1.0))
    with pytest.raises(ClipLossInputError, match=message):
        clip_loss(*args, scale, **kwargs)


def test_bad_options():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        clip_loss(x, x, 1.0, backend="magic")
    with pytest.raises(ValueError, match="precision must be one of"):
        clip_loss(x, x, 1.0, precision="fp8")
    with pytest.raises(ValueError, match="scale_cap must be one of"):
        clip_loss(x, x, 1.0, scale_cap="soft")


def test_auto_backend_on_cpu_is_chunked():
    assert resolve_backend("auto", torch.device("cpu")) == "chunked"


def test_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, palmtree; heavy = [m for m in ('triton', 'matplotlib', 'sklearn',"
        " 'PIL') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    assert palmtree.__version__


FUSED_HERE = palmtree.backends.fused_can_run(torch.device("cpu"))
ALL_BACKENDS = BACKENDS + (["fused"] if FUSED_HERE else [])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("log_scale", [88.0, 89.0, 1e4])
def test_a_huge_logit_scale_is_capped_without_nan(backend, log_scale):
    """exp() overflows fp32 above ~88.7: the clamp's gradient must be 0, not 0 * inf;
    straight-through's gradient exp(theta) * dL/ds is exact below that and refused above
    (it would be inf, and the next Adam step NaN)."""
    img, txt = make_pairs(16, 8, seed=10)
    capped = run(img, txt, math.log(100.0), backend=backend, scale_cap="clamp")
    clamp = run(img, txt, log_scale, backend=backend, scale_cap="clamp")
    assert float(clamp[0].loss) == float(capped[0].loss)
    assert float(clamp[3]) == 0.0 and torch.isfinite(clamp[1]).all()
    if log_scale > 88.72:
        with pytest.raises(palmtree.ClipLossInputError, match="straight_through.*overflows"):
            run(img, txt, log_scale, backend=backend, scale_cap="straight_through")
        return
    st = run(img, txt, log_scale, backend=backend, scale_cap="straight_through")
    assert float(st[0].loss) == float(capped[0].loss)
    assert torch.isfinite(st[1]).all() and math.isfinite(float(st[3]))
    below = run(img, txt, math.log(100.0), backend=backend, scale_cap="straight_through")
    slope = float(below[3]) / 100.0  # dL/ds at the cap
    assert float(st[3]) == pytest.approx(math.exp(log_scale) * slope, rel=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_scale_that_underflows_to_zero_gives_a_zero_gradient(backend):
    """exp(-104) is 0 in fp32: every logit is 0, the loss log(B), d/dtheta exactly 0."""
    img, txt = make_pairs(16, 8, seed=11)
    out, di, dt, ds = run(img, txt, -104.0, backend=backend)
    assert float(out.logit_scale) == 0.0
    assert float(out.loss) == pytest.approx(math.log(16), rel=1e-6)
    assert float(ds) == 0.0
    assert torch.isfinite(di).all() and torch.isfinite(dt).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "dtype,factor",
    [(torch.float32, 2.0**83), (torch.bfloat16, 2.0**100), (torch.float64, 2.0**665)],
)
def test_rows_of_huge_norm_are_normalised_without_overflow(backend, dtype, factor):
    """Squaring 1e25 overflows fp32 (and 1e200 fp64): rows must still become unit vectors,
    so the loss is that of the unscaled rows and the gradient scales by 1 / factor (a
    power of two, so the scaled inputs are exact)."""
    img, txt = make_pairs(16, 8, seed=12)
    img, txt = img.to(dtype), txt.to(dtype)
    base = run(img, txt, backend=backend, precision="ieee")
    img[:5] *= factor
    txt[3:9] *= factor
    big = run(img, txt, backend=backend, precision="ieee")
    assert float(big[0].loss) == pytest.approx(float(base[0].loss), rel=1e-6)
    unit = torch.finfo(dtype).eps
    torch.testing.assert_close(
        big[1][:5].double() * factor, base[1][:5].double(), rtol=8 * unit, atol=0
    )
    torch.testing.assert_close(big[1][5:].double(), base[1][5:].double(), rtol=8 * unit, atol=0)


@pytest.mark.parametrize("backend", ["chunked"] + ALL_BACKENDS[2:])
def test_double_backward_is_refused_by_the_single_pass_backends(backend):
    img, txt = make_pairs(8, 4, seed=13)
    layer = torch.nn.Linear(4, 4)
    out = clip_loss(layer(img), txt, torch.tensor(2.0), backend=backend)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        torch.autograd.grad(out.loss, layer.weight, create_graph=True)


def test_the_reference_backend_gives_exact_second_derivatives():
    """A gradient penalty through a linear layer, against the same penalty in float64."""
    img, txt = make_pairs(8, 4, seed=13)

    def penalty_grad(dtype, backend=None):
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 4).to(dtype)
        x = layer(img.to(dtype))
        if backend is None:
            u = torch.nn.functional.normalize(x, dim=1)
            v = torch.nn.functional.normalize(txt.to(dtype), dim=1)
            logits = math.exp(2.0) * u @ v.T
            labels = torch.arange(8)
            loss = (
                torch.nn.functional.cross_entropy(logits, labels)
                + torch.nn.functional.cross_entropy(logits.T, labels)
            ) / 2
        else:
            loss = clip_loss(x, txt, torch.tensor(2.0), backend=backend).loss
        (g,) = torch.autograd.grad(loss, layer.weight, create_graph=True)
        g.square().sum().backward()
        return layer.weight.grad

    exact = penalty_grad(torch.float64)
    plain = penalty_grad(torch.float32)
    ours = penalty_grad(torch.float32, "reference")
    testing.check_tensor("penalty gradient", ours, plain, exact)


def test_auto_is_chunked_until_a_card_is_measured():
    assert palmtree.backends.FUSED_BY_DEFAULT == ()
    assert resolve_backend("auto", torch.device("cpu")) == "chunked"


@pytest.mark.skipif(not FUSED_HERE, reason="needs Triton (its interpreter on a CPU)")
def test_auto_falls_back_to_chunked_when_triton_fails(monkeypatch):
    """Simulated: auto picks fused, and its kernels fail to compile. One warning quoting
    the error, then chunked, for this call and the next; the result is chunked's."""
    from palmtree.backends import FusedOrChunked
    from palmtree.backends.fused import FusedKernels

    def broken(self, *args):
        raise RuntimeError("ptxas fatal: simulated failure")

    monkeypatch.setattr(palmtree.backends, "_fused_by_default", lambda device: True)
    monkeypatch.setattr(FusedKernels, "forward", broken)
    monkeypatch.setattr(FusedOrChunked, "failure", None)
    img, txt = make_pairs(12, 8, seed=14)
    with pytest.warns(RuntimeWarning, match="ptxas fatal: simulated failure") as caught:
        first = run(img, txt, backend="auto")
        again = run(img, txt, backend="auto")
    assert len(caught) == 1
    want = run(img, txt, backend="chunked")
    for ours in (first, again):
        assert float(ours[0].loss) == float(want[0].loss)
        assert torch.equal(ours[1], want[1])
