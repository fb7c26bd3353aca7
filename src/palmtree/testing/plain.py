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
) -> dict[str, torch.Tensor]:
    """The straightforward computation in ``dtype``: materialised logits, autograd.

    What "as good as plain fp32" compares against (gradient tensors,
    :func:`~palmtree.testing.check_tensor`).
    Returns ``shares``, ``d_img``, ``d_txt`` and ``d_scale`` of ``J`` as
    :func:`~palmtree.testing.clip_truth`, on the device of ``img``. ``precision``
    (``"ieee"``, ``"tf32"``, ``"bf16"``) makes the logits' product and its two backward
    products round their operands as that mode does, with fp32 accumulation
    (:mod:`palmtree.precision`): what a plain fp32 matmul does under
    ``torch.set_float32_matmul_precision``. ``None`` leaves ``@`` as it is.
    """
    sizes = [img.shape[0]] if sizes is None else list(sizes)
    i, t, theta, weights = _plain_inputs(img, txt, logit_scale, sizes, weights, dtype)
    u, v = F.normalize(i, dim=-1, eps=NORM_EPS), F.normalize(t, dim=-1, eps=NORM_EPS)
    logits = theta.exp().clamp(max=logit_scale_max) * _product(u, v, precision)
    labels = torch.arange(len(u), device=u.device)
    terms = F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(
        logits.T, labels, reduction="none"
    )
    shares = torch.stack([part.sum() for part in terms.split(sizes)]) / (2 * len(u))
    (shares * weights).sum().backward()
    return {"shares": shares.detach(), "d_img": i.grad, "d_txt": t.grad, "d_scale": theta.grad}


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
) -> dict[str, torch.Tensor]:
    """The straightforward sigmoid loss in ``dtype``: materialised logits, autograd.

    On the device of ``img``; ``precision`` as in :func:`plain_fp32`.
    """
    sizes = [img.shape[0]] if sizes is None else list(sizes)
    i, t, theta, weights = _plain_inputs(img, txt, logit_scale, sizes, weights, dtype)
    bias = torch.tensor(logit_bias, dtype=dtype, device=img.device, requires_grad=True)
    u, v = F.normalize(i, dim=-1, eps=NORM_EPS), F.normalize(t, dim=-1, eps=NORM_EPS)
    logits = theta.exp().clamp(max=logit_scale_max) * _product(u, v, precision) + bias
    z = 2 * torch.eye(len(u), dtype=dtype, device=img.device) - 1
    rows = F.softplus(-z * logits).sum(1) / len(u)
    shares = torch.stack([part.sum() for part in rows.split(sizes)])
    (shares * weights).sum().backward()
    return {
        "shares": shares.detach(),
        "d_img": i.grad,
        "d_txt": t.grad,
        "d_scale": theta.grad,
        "d_bias": bias.grad,
    }


def _plain_inputs(img, txt, logit_scale, sizes, weights, dtype):
    """Leaf copies of the features and the log scale in ``dtype``, and the ranks' weights,
    all on the device of ``img``."""
    dev = img.device
    weights = [1.0] * len(sizes) if weights is None else weights
    i = img.detach().to(dtype, copy=True).requires_grad_()
    t = txt.detach().to(dtype, copy=True).requires_grad_()
    theta = torch.tensor(logit_scale, dtype=dtype, device=dev, requires_grad=True)
    return i, t, theta, torch.as_tensor(weights, dtype=dtype, device=dev)


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
