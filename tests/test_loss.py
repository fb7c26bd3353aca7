"""Single-process numerics, API and errors of clip_loss / ClipLoss, against float64."""

from __future__ import annotations

import math

import pytest
import torch
from oracle import LOG_10, assert_close_to_truth, make_batch, max_err, truth

import palmtree
from palmtree import ClipLoss, ClipLossInputError, clip_loss, masked_mean_pool
from palmtree.backends import resolve_backend

BACKENDS = ["reference", "chunked"]
EPS32 = torch.finfo(torch.float32).eps


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
    img, txt = make_batch(big, dim, seed=big)
    exact = truth(img, txt, LOG_10, [big])
    naive = truth(img, txt, LOG_10, [big], dtype=torch.float32)
    out, di, dt, ds = run(img, txt, backend=backend, precision="ieee", chunk_size=chunk)
    atol = EPS32 * 10
    assert_close_to_truth("loss", out.loss, naive["loss"], exact["loss"], atol=atol)
    assert_close_to_truth("d_img", di, naive["d_img"], exact["d_img"])
    assert_close_to_truth("d_txt", dt, naive["d_txt"], exact["d_txt"])
    assert_close_to_truth("d_scale", ds, naive["d_scale"], exact["d_scale"])
    assert float(out.loss_global) == pytest.approx(float(out.loss.detach()), rel=1e-6)


def test_chunk_size_does_not_change_the_result():
    img, txt = make_batch(50, 16, seed=1)
    base = run(img, txt, backend="chunked", chunk_size=50)
    for chunk in (1, 7, 49, 1000):
        other = run(img, txt, backend="chunked", chunk_size=chunk)
        assert float(other[0].loss.detach()) == pytest.approx(
            float(base[0].loss.detach()), rel=1e-6
        )
        assert max_err(other[1], base[1]) <= 1e-6 * float(base[1].abs().max())


@pytest.mark.parametrize("precision,unit", [("tf32", 2.0**-11), ("bf16", 2.0**-8)])
def test_reduced_precision_is_as_good_as_plain_pytorch(precision, unit):
    """chunked vs float64 no worse than the same rounding done by plain autograd."""
    img, txt = make_batch(96, 64, seed=2)
    exact = truth(img, txt, LOG_10, [96])
    ref = run(img, txt, backend="reference", precision=precision)
    ours = run(img, txt, backend="chunked", precision=precision, chunk_size=32)
    for k, name in enumerate(("d_img", "d_txt", "d_scale"), start=1):
        assert_close_to_truth(name, ours[k], ref[k], exact[name], rel=unit / 16)
    assert_close_to_truth("loss", ours[0].loss, ref[0].loss, exact["loss"], atol=EPS32 * 10)
    # The operands really are rounded: the error is of the order of the unit roundoff.
    assert max_err(ours[0].loss, exact["loss"]) > EPS32 * float(exact["loss"])
    assert max_err(ours[0].loss, exact["loss"]) < 10 * unit * 10


def test_default_precision_follows_torch_setting():
    img, txt = make_batch(40, 16, seed=3)
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
    img, txt = make_batch(48, 32, seed=5)
    img16, txt16 = img.bfloat16(), txt.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, di, dt, _ = run(img16, txt16, backend=backend, precision="ieee")
    ref, ri, rt, _ = run(img16.float(), txt16.float(), backend=backend, precision="ieee")
    assert out.loss.dtype == torch.float32
    assert float(out.loss.detach()) == float(ref.loss.detach())
    assert di.dtype == dt.dtype == torch.bfloat16
    torch.testing.assert_close(di, ri.bfloat16())


def test_autocast_does_not_reach_the_logits():
    img, txt = make_batch(32, 16, seed=6)
    plain = run(img, txt, backend="reference", precision="ieee")[0].loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = run(img, txt, backend="reference", precision="ieee")[0].loss
    assert float(auto) == float(plain)


def test_scale_cap_modes():
    img, txt = make_batch(16, 8, seed=7)
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
    exact = truth(img, txt, LOG_10, [10])
    assert float(out.loss_global) == pytest.approx(float(exact["loss"]), rel=1e-6)
    assert float((out.loss_i2t + out.loss_t2i) / 2) == pytest.approx(float(out.loss_global))
    m = out.metrics()
    assert m["b_local"] == m["b_global"] == 10 and m["logit_scale"] == pytest.approx(10.0)


def test_normalize_false_takes_features_as_given():
    img, txt = make_batch(20, 8, seed=9)
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
