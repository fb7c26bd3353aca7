"""A tiny two-tower model, its data, and its gradients in float64 and in plain fp32.

Shared by the DDP and the accumulation tests: both check parameter gradients of a model
trained through palmtree's losses against the same model in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import palmtree
from palmtree import testing


class Dropout(nn.Module):
    """Dropout whose masks come from fp32 uniform draws, whatever the input's dtype, so
    that an fp32 and an fp64 copy of a model drop the same units from the same RNG state."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape, device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


class Towers(nn.Module):
    """Image (12 -> 10) and text (20 tokens -> 7) towers; texts stay token latents."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Sequential(
            nn.Linear(12, 16), nn.GELU(), Dropout(dropout), nn.Linear(16, 10)
        )
        self.text = nn.Sequential(nn.Embedding(20, 6), nn.Linear(6, 7), Dropout(dropout))

    def forward(self, pixels, tokens, mask):
        return self.image(pixels), self.text(tokens), mask


def make_loss(kind: str, backend: str):
    """The loss module that joins the towers' widths (10 and 7) in 8 dimensions."""
    torch.manual_seed(1)
    cls = palmtree.ClipLoss if kind == "clip" else palmtree.SigLipLoss
    return cls(image_dim=10, text_dim=7, embed_dim=8, backend=backend)


class TwoTower(nn.Module):
    """The towers and the loss in one module, as a DDP-wrapped training model holds them."""

    def __init__(self, backend, loss="clip", dropout=0.0):
        super().__init__()
        self.towers = Towers(dropout)
        self.loss = make_loss(loss, backend)

    def forward(self, pixels, tokens, mask):
        return self.loss(*self.towers(pixels, tokens, mask))


def tower_batch(big, seed=5):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(big, 12, generator=g)
    tokens = torch.randint(0, 20, (big, 5), generator=g)
    lengths = torch.randint(1, 6, (big,), generator=g)
    mask = (torch.arange(5)[None, :] < lengths[:, None]).long()
    return pixels, tokens, mask


def split(batch, sizes):
    """``batch`` (a tuple of tensors) cut into consecutive pieces of ``sizes`` rows."""
    out, start = [], 0
    for n in sizes:
        out.append(tuple(x[start : start + n] for x in batch))
        start += n
    return out


def float64_loss(kind: str, img, txt, module):
    """The global loss of the whole batch in float64, plainly (materialised logits)."""
    u = F.normalize(img, dim=1, eps=1e-6)
    v = F.normalize(txt, dim=1, eps=1e-6)
    logits = module.logit_scale.exp().clamp(max=100.0) * u @ v.T
    labels = torch.arange(len(u))
    if kind == "clip":
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    z = 2 * torch.eye(len(u), dtype=u.dtype) - 1
    return F.softplus(-z * (logits + module.logit_bias)).sum() / len(u)


def gradients(kind, backend, pieces, seeds=None, dropout=0.0):
    """Parameter gradients of the towers and the loss on the concatenation of ``pieces``.

    ``pieces[r]`` are rank ``r``'s micro-batches, encoded in order after
    ``torch.manual_seed(seeds[r])`` (each rank's dropout draws). Returns ``(exact, plain,
    scalar_bounds)``: float64 gradients, those of the plain fp32 model (palmtree's loss in
    one process), and for the loss's scalar parameters the loss's own derived bound at
    the fp32 features. Keys are ``towers.<name>`` and ``loss.<name>``.
    """
    out = []
    for dtype in (torch.float32, torch.float64):
        towers = Towers(dropout).to(dtype)
        loss = make_loss(kind, backend).to(dtype)
        feats = []
        for r, rank_pieces in enumerate(pieces):
            if seeds is not None:
                torch.manual_seed(seeds[r])
            feats += [towers(p.to(dtype), t, m) for p, t, m in rank_pieces]
        img = torch.cat([f[0] for f in feats])
        txt = torch.cat([f[1] for f in feats])
        mask = torch.cat([f[2] for f in feats])
        if dtype == torch.float32:
            loss(img, txt, mask).loss.backward()
            with torch.no_grad():
                img32 = loss.image_proj(img)
                txt32 = palmtree.masked_mean_pool(loss.text_proj(txt), mask)
        else:
            pooled = palmtree.masked_mean_pool(loss.text_proj(txt), mask)
            float64_loss(kind, loss.image_proj(img), pooled, loss).backward()
        grads = {f"towers.{n}": p.grad.clone() for n, p in towers.named_parameters()}
        grads.update({f"loss.{n}": p.grad.clone() for n, p in loss.named_parameters()})
        out.append(grads)
    theta = float(loss.logit_scale.detach())
    if kind == "clip":
        ref = testing.clip_truth(img32, txt32, theta)
        bounds = {"loss.logit_scale": ref.d_scale_bound}
    else:
        ref = testing.siglip_truth(img32, txt32, theta, float(loss.logit_bias.detach()))
        bounds = {"loss.logit_scale": ref.d_scale_bound, "loss.logit_bias": ref.d_bias_bound}
    plain, exact = out
    return exact, plain, bounds


def check_gradients(got: dict, exact: dict, plain: dict, bounds: dict, where: str = "") -> None:
    """Weights within 2x the plain fp32 error; scalar parameters within the plain error
    plus twice the loss's derived bound (both runs share the towers' rounding and differ
    only in the loss, each within that bound of the truth)."""
    for name, want in exact.items():
        label = f"{name}{where}"
        if want.numel() > 1:
            testing.check_tensor(label, got[name], plain[name], want)
        else:
            bound = testing.max_error(plain[name], want) + 2 * bounds[name]
            testing.check_scalar(label, got[name], want, bound)


class WithNorm(Towers):
    """The towers with a training-mode BatchNorm on the image side: buffers that every
    forward updates (running mean and variance, the count of batches)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__(dropout)
        self.norm = nn.BatchNorm1d(10)

    def forward(self, pixels, tokens, mask):
        img, txt, mask = super().forward(pixels, tokens, mask)
        return self.norm(img), txt, mask


class Faulty(nn.Module):
    """``towers`` that misbehave at micro-batch ``at`` of pass ``when`` (1: the encoding
    without a graph, 2: the one with a graph), as ``what`` says: ``"raise"``, ``"width"``
    (image features 6 wide), ``"nan"`` (one image feature NaN), ``"scale"`` (image
    features times ``1 + eps``), ``"backward"`` (image features whose backward raises),
    or ``"rng"``: every micro-batch of both passes drops units with draws from a generator
    of its own, which accumulate cannot replay. ``what=None`` behaves."""

    def __init__(self, towers: nn.Module, what=None, at: int = 0, when: int = 2, eps=0.0):
        super().__init__()
        self.towers, self.what, self.at, self.when, self.eps = towers, what, at, when, eps
        self.calls = {1: 0, 2: 0}
        self.generator = torch.Generator().manual_seed(3)

    def forward(self, pixels, tokens, mask):
        now = 2 if torch.is_grad_enabled() else 1
        k, self.calls[now] = self.calls[now], self.calls[now] + 1
        img, txt, mask = self.towers(pixels, tokens, mask)
        if self.what == "rng":
            keep = torch.rand(img.shape, generator=self.generator) >= 0.2
            return img * keep / 0.8, txt, mask
        if self.what is None or (now, k) != (self.when, self.at):
            return img, txt, mask
        if self.what == "raise":
            raise RuntimeError("simulated failure")
        if self.what == "width":
            return img[:, :6], txt, mask
        if self.what == "nan":
            bad = torch.zeros_like(img)
            bad[0, 0] = float("nan")
            return img + bad, txt, mask
        if self.what == "scale":
            return img * (1 + self.eps), txt, mask
        if self.what == "backward":
            return _FailsInBackward.apply(img), txt, mask
        raise ValueError(f"unknown fault {self.what!r}")


class _FailsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("simulated failure in backward")


def state_of(*modules) -> dict:
    """Every ``.grad`` (``None`` included) and buffer of ``modules``, and the CPU RNG state,
    copied: what accumulate must leave as it found when it raises."""
    out = {"rng": torch.get_rng_state()}
    for i, m in enumerate(modules):
        out.update({f"{i}.grad.{n}": _copy(p.grad) for n, p in m.named_parameters()})
        out.update({f"{i}.buffer.{n}": _copy(b) for n, b in m.named_buffers()})
    return out


def _copy(x):
    return None if x is None else x.detach().clone()


def state_differences(before: dict, after: dict) -> list[str]:
    """The entries of two :func:`state_of` records that differ (``[]``: none)."""
    diff = []
    for key, a in before.items():
        b = after.get(key)
        if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
            diff.append(key)
    return diff
