"""Unit rows: fp32 ``x / max(||x||, eps)`` for rows of any finite norm, in any float dtype.

The one place the losses' normalisation is written: :data:`NORM_EPS`, the single-pass
backends' :func:`unit_rows` with its in-place backward (:func:`unit_rows_backward`), and
:func:`unit_rows_differentiable` through autograd for the reference backend. Each row is
first scaled by the power of two that brings its largest entry into ``[0.5, 1)``: exact,
and no square overflows or underflows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: The norm below which a row is divided by ``NORM_EPS`` instead (CLIP's sketch: 1e-6).
NORM_EPS = 1e-6


@dataclass
class RowNorms:
    """How :func:`unit_rows` divided each row: ``u = x / (2**exponent * divisor)``.

    For a row of norm at least ``eps``, ``2**exponent`` brings its largest entry into
    ``[0.5, 1)`` and ``divisor`` is the norm of the scaled row; below ``eps`` (``small``)
    the divisor is ``eps`` itself and the exponent 0.
    """

    exponent: torch.Tensor
    divisor: torch.Tensor
    small: torch.Tensor


def _times_pow2(x: torch.Tensor, k: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """``x * 2**k``, exact barring under/overflow of the result: in two halves, so that
    neither factor overflows where ``2**k`` alone would (in ``x`` itself if ``inplace``)."""
    half = torch.div(k, 2, rounding_mode="floor")
    two = torch.tensor(2.0, dtype=x.dtype, device=x.device)
    if inplace:
        return x.mul_(torch.pow(two, half)).mul_(torch.pow(two, k - half))
    return x * torch.pow(two, half) * torch.pow(two, k - half)


def unit_rows(x: torch.Tensor, normalize: bool, eps: float = NORM_EPS):
    """fp32 ``x / max(||x||, eps)`` row-wise, and the :class:`RowNorms` (``None`` if not
    normalising).

    Each row is first scaled by the power of two that brings its largest entry into
    ``[0.5, 1)``: exact, and no square overflows or underflows, so a row of any finite
    norm in any float dtype (fp64 beyond fp32's range included) becomes a unit vector.
    Done here rather than by autograd so that the backward can work in place on the
    gradient buffers: at large ``B`` the ``B x D`` temporaries of autograd's
    normalisation backward were a large part of the peak memory.
    """
    if not normalize:
        return x.float().contiguous(), None
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    exponent = torch.frexp(x.abs().amax(dim=1, keepdim=True).to(wide)).exponent.long()
    y = _times_pow2(x.to(wide), -exponent).float()
    y_norm = torch.linalg.vector_norm(y, dim=1, keepdim=True)
    small = _times_pow2(y_norm.double(), exponent) < eps
    exponent = exponent.masked_fill(small, 0)
    divisor = torch.where(small, eps, y_norm)
    u = torch.where(small, x.float(), y) / divisor
    return u.contiguous(), RowNorms(exponent, divisor, small)


def unit_rows_backward(
    grad: torch.Tensor, u: torch.Tensor, norms: RowNorms | None, dtype: torch.dtype
) -> torch.Tensor:
    """Gradient w.r.t. the raw rows, in ``dtype`` (``grad`` is fp32, modified in place)."""
    if norms is None or grad.numel() == 0:
        return grad.to(dtype)
    # d(x/|x|) = (g - u <u, g>) / |x|; below eps the norm is the constant eps: g / eps.
    dot = torch.bmm(u.unsqueeze(1), grad.unsqueeze(2)).squeeze(2)
    dot.masked_fill_(norms.small, 0.0)
    grad.addcmul_(u, dot, value=-1).div_(norms.divisor)
    # In place when the features are fp32: two B x D temporaries were the loss's peak.
    out = grad if dtype == torch.float32 else grad.to(dtype)
    return _times_pow2(out, -norms.exponent, inplace=True)


def unit_rows_differentiable(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """fp32 ``x / max(||x||, eps)`` through autograd, for rows of any finite norm.

    As :func:`unit_rows`: each row is first scaled by the (constant)
    power of two that brings its largest entry into ``[0.5, 1)``, so no square overflows.
    """
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    exponent = torch.frexp(x.detach().abs().amax(dim=1, keepdim=True).to(wide)).exponent
    factor = torch.pow(torch.tensor(2.0, dtype=torch.float64, device=x.device), -exponent)
    y = (x.to(wide) * factor.to(wide)).float()
    # The eps of x's scale, in y's (inf where that overflows: the row is then below eps).
    floor = (eps * factor).float()
    return y / torch.maximum(torch.linalg.vector_norm(y, dim=1, keepdim=True), floor)
