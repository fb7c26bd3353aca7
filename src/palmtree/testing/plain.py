"""The naive fp32 baseline: materialised logits and autograd, in any dtype and mode.

What "as good as plain fp32" measures against (gradient tensors,
:func:`palmtree.testing.check_tensor`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..normalize import NORM_EPS
from ..precision import cast_operand, mm


def plain_fp32(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: float,
    *,
    sizes: list[int] | None = None,
    weights: list[float] | None = None,
    logit_scale_max: float = 100.0,
    dtype: torch.dtype = torch.float32,
    precision: str | None = None,
    labels: torch.Tensor | None = None,
    same_label: str = "positive",
    negatives: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The straightforward computation in ``dtype``: materialised logits, autograd.

    What "as good as plain fp32" compares against (gradient tensors,
    :func:`~palmtree.testing.check_tensor`).
    Returns ``shares``, ``d_img``, ``d_txt`` and ``d_scale`` of ``J`` as
    :func:`~palmtree.testing.clip_truth`, and ``d_neg`` where ``negatives`` are given,
    on the device of ``img``; ``labels``, ``same_label`` and ``negatives`` as there (the
    several targets as ``cross_entropy``'s probabilities, the ignored logits at
    ``-inf``). ``precision`` (``"ieee"``, ``"tf32"``, ``"bf16"``) makes the logits'
    product and its two backward products round their operands as that mode does, with
    fp32 accumulation (:mod:`palmtree.precision`): what a plain fp32 matmul does under
    ``torch.set_float32_matmul_precision``. ``None`` leaves ``@`` as it is.
    """
    sizes = [img.shape[0]] if sizes is None else list(sizes)
    i, t, theta, weights = _plain_inputs(img, txt, logit_scale, sizes, weights, dtype)
    neg = _leaf(negatives, dtype, img.device)
    u, cols = _unit_columns(i, t, neg)
    logits = theta.exp().clamp(max=logit_scale_max) * _product(u, cols, precision)
    terms = _clip_terms(logits, labels, same_label)
    shares = torch.stack([part.sum() for part in terms.split(sizes)]) / (2 * len(u))
    (shares * weights).sum().backward()
    out = {"shares": shares.detach(), "d_img": i.grad, "d_txt": t.grad, "d_scale": theta.grad}
    return out if neg is None else {**out, "d_neg": neg.grad}


def plain_fp32_siglip(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: float,
    logit_bias: float,
    *,
    sizes: list[int] | None = None,
    weights: list[float] | None = None,
    logit_scale_max: float = math.inf,
    dtype: torch.dtype = torch.float32,
    precision: str | None = None,
    labels: torch.Tensor | None = None,
    same_label: str = "positive",
    negatives: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The straightforward sigmoid loss in ``dtype``: materialised logits, autograd.

    On the device of ``img``; ``precision``, ``labels``, ``same_label``, ``negatives`` and
    ``d_neg`` as in :func:`plain_fp32` (the ignored terms masked out of the sum).
    """
    sizes = [img.shape[0]] if sizes is None else list(sizes)
    i, t, theta, weights = _plain_inputs(img, txt, logit_scale, sizes, weights, dtype)
    bias = torch.tensor(logit_bias, dtype=dtype, device=img.device, requires_grad=True)
    neg = _leaf(negatives, dtype, img.device)
    u, cols = _unit_columns(i, t, neg)
    logits = theta.exp().clamp(max=logit_scale_max) * _product(u, cols, precision) + bias
    z, ignored = _signs(logits, labels, same_label)
    terms = F.softplus(-z * logits)
    if ignored is not None:
        terms = terms.masked_fill(ignored, 0.0)
    rows = terms.sum(1) / len(u)
    shares = torch.stack([part.sum() for part in rows.split(sizes)])
    (shares * weights).sum().backward()
    out = {
        "shares": shares.detach(),
        "d_img": i.grad,
        "d_txt": t.grad,
        "d_scale": theta.grad,
        "d_bias": bias.grad,
    }
    return out if neg is None else {**out, "d_neg": neg.grad}


def _plain_inputs(img, txt, logit_scale, sizes, weights, dtype):
    """Leaf copies of the features and the log scale in ``dtype``, and the ranks' weights,
    all on the device of ``img``."""
    dev = img.device
    weights = [1.0] * len(sizes) if weights is None else weights
    i = img.detach().to(dtype, copy=True).requires_grad_()
    t = txt.detach().to(dtype, copy=True).requires_grad_()
    theta = torch.tensor(logit_scale, dtype=dtype, device=dev, requires_grad=True)
    return i, t, theta, torch.as_tensor(weights, dtype=dtype, device=dev)


def _leaf(x, dtype, device):
    """A leaf copy of ``x`` in ``dtype`` on ``device`` (``None`` stays ``None``)."""
    return None if x is None else x.detach().to(device, dtype, copy=True).requires_grad_()


def _unit_columns(i, t, neg):
    """The unit images and the unit columns: the texts, then the negatives."""
    u, v = F.normalize(i, dim=-1, eps=NORM_EPS), F.normalize(t, dim=-1, eps=NORM_EPS)
    if neg is None:
        return u, v
    return u, torch.cat([v, F.normalize(neg, dim=-1, eps=NORM_EPS)])


def _same(logits, labels, same_label):
    """``[B, B]``: which pairs share a label (``labels`` on the logits' device)."""
    if same_label not in ("positive", "ignore"):
        raise ValueError(f"same_label must be 'positive' or 'ignore', got {same_label!r}")
    labels = torch.as_tensor(labels, device=logits.device)
    return labels[:, None] == labels[None, :]


def _padded(x, logits):
    """``x`` (``[B, B]``) with zero (``False``) columns for the negatives."""
    extra = x.new_zeros(len(x), logits.shape[1] - len(x))
    return torch.cat([x, extra], dim=1)


def _clip_terms(logits, labels, same_label):
    """Each pair's row term plus its column term (the texts' columns only)."""
    B = len(logits)
    own = torch.arange(B, device=logits.device)
    if labels is None:
        return F.cross_entropy(logits, own, reduction="none") + F.cross_entropy(
            logits[:, :B].T, own, reduction="none"
        )
    same = _same(logits, labels, same_label)
    if same_label == "ignore":  # each pair its one target, the rest of its label at -inf
        ignored = _padded(same & (own[:, None] != own[None, :]), logits)
        logits = logits.masked_fill(ignored, -math.inf)
        row_target, col_target = own, own
    else:  # 1 / |P| on each of its label, as probabilities (symmetric: rows and columns)
        col_target = same.to(logits.dtype) / same.sum(1, keepdim=True)
        row_target = _padded(col_target, logits)
    return F.cross_entropy(logits, row_target, reduction="none") + F.cross_entropy(
        logits[:, :B].T, col_target, reduction="none"
    )


def _signs(logits, labels, same_label):
    """SigLIP's ``z`` (+1 on the positives, -1 elsewhere and on the negatives) and the
    ignored entries (``None``: none)."""
    B = len(logits)
    eye = torch.eye(B, dtype=torch.bool, device=logits.device)
    if labels is None:
        positive, ignored = eye, None
    elif same_label == "ignore":
        positive, ignored = eye, _padded(_same(logits, labels, same_label) & ~eye, logits)
    else:
        positive, ignored = _same(logits, labels, same_label), None
    z = torch.where(_padded(positive, logits), 1.0, -1.0).to(logits.dtype)
    return z, ignored


def _product(u: torch.Tensor, v: torch.Tensor, precision: str | None) -> torch.Tensor:
    """``u @ v.T``, with the operands of it and of its backward rounded as ``precision``."""
    return u @ v.T if precision is None else _RoundedProduct.apply(u, v.T, precision)


class _RoundedProduct(torch.autograd.Function):
    """``a @ b`` whose forward and backward products round their operands as ``precision``."""

    @staticmethod
    def forward(ctx, a, b, precision):
        ctx.save_for_backward(a, b)
        ctx.precision = precision
        return _rounded_mm(a, b, precision)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        p = ctx.precision
        return _rounded_mm(grad, b.T, p), _rounded_mm(a.T, grad, p), None


def _rounded_mm(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    return mm(cast_operand(a, precision), cast_operand(b, precision), precision)
