"""The temperature: ``min(exp(logit_scale), cap)`` with a gradient that is never NaN."""

from __future__ import annotations

import math

import torch

SCALE_CAPS = ("clamp", "straight_through")


def capped_scale(logit_scale: torch.Tensor, cap: float, mode: str = "clamp") -> torch.Tensor:
    """``min(exp(logit_scale), cap)`` in fp32.

    ``"clamp"``: above the cap the temperature gets no gradient (the original CLIP
    behaviour; pair it with clamping the parameter after each step, as open_clip does).
    ``"straight_through"``: the value is capped but the gradient is that of ``exp``, so
    the optimiser can still pull a parameter that drifted above the cap back down.
    Neither mode turns a huge ``logit_scale`` (``exp`` overflows fp32 above ~88.7) into
    a NaN value or gradient.
    """
    if mode not in SCALE_CAPS:
        raise ValueError(f"scale_cap must be one of {SCALE_CAPS}, got {mode!r}")
    x = torch.as_tensor(logit_scale).float()
    if mode == "straight_through":
        return _StraightThroughCap.apply(x, cap)
    return _capped(x, cap)


def _capped(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``min(exp(x), cap)`` with ``exp``'s argument held just above ``log(cap)``: the value
    still reaches the cap, and the clamp's zero gradient never meets an infinite ``exp'``
    (0 * inf is NaN)."""
    return x.clamp(max=min(math.log(cap) + 1.0, 88.0)).exp().clamp(max=cap)


class _StraightThroughCap(torch.autograd.Function):
    """``min(exp(x), cap)`` whose gradient is ``exp(x)``'s, uncapped."""

    @staticmethod
    def forward(ctx, x, cap):
        ctx.save_for_backward(x)
        return _capped(x, cap)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        # exp(x) in float64: finite far beyond fp32's range; a zero upstream stays 0.
        slope = torch.where(grad == 0, 0.0, grad.double() * x.double().exp())
        return slope.to(grad.dtype), None
