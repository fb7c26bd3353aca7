"""The temperature: ``min(exp(logit_scale), cap)`` with a gradient that is never NaN."""

from __future__ import annotations

import math

import torch

SCALE_CAPS = ("clamp", "straight_through")

#: The largest log-temperature whose ``exp`` the loss computes in fp32 (``exp(88.72)`` is
#: 3.39e38; fp32 overflows just above). Beyond it the scale is the cap (``"clamp"`` with a
#: cap below ``exp(LOG_SCALE_LIMIT)``) or the call is refused (:func:`log_scale_problem`).
LOG_SCALE_LIMIT = 88.72


def capped_scale(logit_scale: torch.Tensor, cap: float, mode: str = "clamp") -> torch.Tensor:
    """``min(exp(logit_scale), cap)`` in fp32.

    ``"clamp"``: above the cap the temperature gets no gradient (the original CLIP
    behaviour; pair it with clamping the parameter after each step, as open_clip does).
    ``"straight_through"``: the value is capped but the gradient is that of ``exp``, so
    the optimiser can still pull a parameter that drifted above the cap back down.
    Neither mode turns a huge ``logit_scale`` (``exp`` overflows fp32 above ~88.7) into
    a NaN value or gradient; where the value or the gradient would overflow instead (no
    cap, or straight-through), the loss refuses the call (:func:`log_scale_problem`).
    """
    problem = scale_cap_problem(mode)
    if problem is not None:
        raise ValueError(problem)
    x = torch.as_tensor(logit_scale).float()
    if mode == "straight_through":
        return _StraightThroughCap.apply(x, cap)
    return _capped(x, cap)


def scale_cap_problem(mode) -> str | None:
    """Why ``mode`` is no ``scale_cap`` (``None`` if it is one)."""
    if mode in SCALE_CAPS:
        return None
    return f"scale_cap must be one of {SCALE_CAPS}, got {mode!r}"


def _capped(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``min(exp(x), cap)`` with ``exp``'s argument held just above ``log(cap)`` (and at
    :data:`LOG_SCALE_LIMIT`): the value still reaches the cap, and the clamp's zero
    gradient never meets an infinite ``exp'`` (0 * inf is NaN)."""
    return x.clamp(max=min(math.log(cap) + 1.0, LOG_SCALE_LIMIT)).exp().clamp(max=cap)


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


def log_scale_problem(log_scale: float, cap: float, mode: str) -> str | None:
    """Why a log-temperature of value ``log_scale`` cannot be used (``None`` if it can).

    Its ``exp`` overflows fp32 above :data:`LOG_SCALE_LIMIT`. With ``"clamp"`` and a cap
    below that, the scale is the cap and the gradient 0, as in CLIP; without such a cap
    the scale itself would be ``inf`` (or silently held below it), and with
    ``"straight_through"`` the gradient ``exp(log_scale) * dL/ds`` would be ``inf``.
    """
    if not log_scale > LOG_SCALE_LIMIT:  # nan is reported as non-finite elsewhere
        return None
    reason = log_scale_reason(cap, mode)
    return None if reason is None else f"logit_scale = {log_scale:.6g}: {reason}"


def log_scale_reason(cap: float, mode: str) -> str | None:
    """Why a log-scale above :data:`LOG_SCALE_LIMIT` cannot be used with this cap and
    mode (``None``: it can, the cap holds the scale)."""
    if mode == "straight_through":
        return (
            "with scale_cap='straight_through' its gradient is exp(logit_scale) * dL/ds, "
            f"which overflows fp32 above {LOG_SCALE_LIMIT}; clamp the parameter (e.g. to "
            "ln(logit_scale_max)) or use scale_cap='clamp'"
        )
    if cap > math.exp(LOG_SCALE_LIMIT):
        return (
            f"exp(logit_scale) overflows fp32 above {LOG_SCALE_LIMIT} and "
            f"logit_scale_max={cap} does not cap it; pass a finite logit_scale_max (CLIP "
            "uses 100) or clamp the parameter"
        )
    return None


def loss_range_problem(loss: str, log_scale: float, bias: float, cap: float, B: int):
    """Why the loss's fp32 sums could overflow at this scale (``None`` if they cannot).

    A CLIP term is at most ``2 s + log B`` and there are ``2 B`` of them; a SigLIP term at
    most ``s + |bias| + 1`` and there are ``B**2``. Both are far beyond any scale a model
    trains at (``s`` near ``1e38 / B``), but a scale there would make the loss ``inf``.
    """
    if not (math.isfinite(log_scale) and math.isfinite(bias)):
        return None  # reported as non-finite, or not read (check_finite=False)
    scale = min(math.exp(min(log_scale, LOG_SCALE_LIMIT)), cap)
    if largest_loss_sum(loss, scale, bias, max(B, 1)) < FP32_MAX:
        return None
    return f"the scale {scale:.3g} (and bias {bias:.3g}) at a global batch of {B} {OVERFLOWS}"


def largest_loss_sum(loss: str, scale, bias, B, log=math.log):
    """The largest sum the loss forms at this scale, bias and global batch ``B >= 1``: the
    one rule for :func:`loss_range_problem` (floats) and its compiled form (float64
    tensors, ``log=torch.log``)."""
    if loss == "siglip":
        return B * B * (scale + abs(bias) + 1.0)
    return 2.0 * B * (2.0 * scale + log(B))


FP32_MAX = float(torch.finfo(torch.float32).max)
#: :func:`loss_range_problem`'s verdict, after the values it names.
OVERFLOWS = "would make the loss's sums overflow fp32; cap the scale (logit_scale_max)"
