"""Float64 single-process ground truth and the seeded data every test shares."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def make_batch(big: int, dim: int, seed: int, noise: float = 0.7, dtype=torch.float32):
    """Correlated (image, text) pairs with an unnormalised, realistic spread of norms.

    A negative ``noise`` gives the adversarial batch instead: every similarity near
    -1 (so at scale 100 every logit sits near -100, where a fixed max-shift
    underflows) and the first two pairs duplicated.
    """
    g = torch.Generator().manual_seed(seed)
    if noise < 0:
        e = torch.randn(dim, generator=g, dtype=torch.float64)
        img = e + 0.05 * torch.randn(big, dim, generator=g, dtype=torch.float64)
        txt = -e + 0.05 * torch.randn(big, dim, generator=g, dtype=torch.float64)
        if big >= 2:
            img[1], txt[1] = img[0], txt[0]
        return img.to(dtype), txt.to(dtype)
    base = torch.randn(big, dim, generator=g, dtype=torch.float64)
    img = base * (1 + torch.rand(big, 1, generator=g, dtype=torch.float64))
    txt = base + noise * torch.randn(big, dim, generator=g, dtype=torch.float64)
    return img.to(dtype), txt.to(dtype)


def shares(img, txt, logit_scale, sizes, cap=100.0):
    """Per-rank shares of the global loss (they add up to the loss), in img's dtype."""
    u = F.normalize(img, dim=-1, eps=1e-6)
    v = F.normalize(txt, dim=-1, eps=1e-6)
    s = logit_scale.exp().clamp(max=cap)
    logits = s * u @ v.T
    labels = torch.arange(len(u))
    row = F.cross_entropy(logits, labels, reduction="none")
    col = F.cross_entropy(logits.T, labels, reduction="none")
    terms = row + col
    out, start = [], 0
    for n in sizes:
        out.append(terms[start : start + n].sum() / (2 * len(u)))
        start += n
    return torch.stack(out)


def truth(img, txt, log_scale: float, sizes, weights=None, dtype=torch.float64, cap=100.0):
    """Loss, shares and gradients of ``J = sum_r w_r * share_r`` computed in ``dtype``.

    With all weights 1, ``J`` is the single-process loss on the global batch.
    Returns a dict with ``loss`` (the global loss), ``shares`` [N], ``d_img``,
    ``d_txt`` (dJ/d features) and ``d_scale`` (dJ/d log-scale).
    """
    weights = torch.ones(len(sizes)) if weights is None else torch.as_tensor(weights)
    i = img.detach().to(dtype).requires_grad_()
    t = txt.detach().to(dtype).requires_grad_()
    ls = torch.tensor(log_scale, dtype=dtype, requires_grad=True)
    sh = shares(i, t, ls, sizes, cap)
    (sh * weights.to(dtype)).sum().backward()
    return {
        "loss": sh.sum().detach(),
        "shares": sh.detach(),
        "d_img": i.grad,
        "d_txt": t.grad,
        "d_scale": ls.grad,
    }


def max_err(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def assert_close_to_truth(name, ours, naive, exact, factor=2.0, rel=1e-6, atol=0.0):
    """``|ours - exact| <= factor * |naive - exact| + rel * max|exact| + atol`` (max norms).

    ``naive`` is a straightforward same-precision computation of the same thing, so
    the bound says "no worse than what the dtype achieves done plainly"; ``atol`` is
    for values that cannot beat the rounding of their inputs (a loss cannot be more
    exact than one logit, ``eps * scale``).
    """
    scale = float(exact.double().abs().max()) if exact.numel() else 0.0
    bound = factor * max_err(naive, exact) + rel * scale + atol
    err = max_err(ours, exact)
    assert not torch.isnan(torch.as_tensor(ours)).any(), f"{name}: NaN"
    assert err <= bound, (
        f"{name}: error {err:.3e} > bound {bound:.3e} (naive {max_err(naive, exact):.3e})"
    )


LOG_10 = math.log(10.0)
