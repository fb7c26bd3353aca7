"""The bench's correctness columns: each case against ``palmtree.testing``'s float64 truth.

``loss_diff = |loss - L| / |L|`` and ``grad_diff``, the largest of ``max|g - g*| / max|g*|``
over the image features, the text features and the log-temperature, where ``L, g*`` come
from :func:`palmtree.testing.reference` on the same inputs, computed once per ``(B, D)``
on the bench's device.

The reference also bounds the error that an fp32 computation of the loss and of the
temperature's gradient may have (docs/design.md, "What exact means"); a row's ``note``
says whether both lie within those bounds. The bound depends on the operand precision,
and each precision's bound takes another pass over the ``B x B`` logits, so it is
computed for one precision per ``(B, D)``: ``ieee`` when the sweep has it, else the
sweep's first. Cases in that precision get the verdict, the others only the relative
errors. The feature gradients get no verdict: testing's rule for them compares with a
plain fp32 gradient, a ``B x B`` computation that the benchmark's sizes do not allow.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import testing
from .cases import SCALE_CAP, make_inputs

#: How a row's note begins when its loss and temperature gradient are within the bounds,
#: and when one of them is not.
WITHIN = "within the fp32 bounds"
OUTSIDE = "OUTSIDE the fp32 bounds"


def truth(img: torch.Tensor, txt: torch.Tensor, log_scale: float, precision: str) -> dict:
    """The float64 loss and gradients of ``img, txt`` (CPU tensors) and the fp32 bounds.

    Runs on the inputs' device; on CUDA in row blocks of 256 MB (the default blocks of
    32 MB would mean thousands of small launches at the GPU sizes).
    """
    big = max(len(img), 1)
    block = max(1, (1 << 25) // big) if img.is_cuda else None
    ref = testing.reference(
        img, txt, log_scale, logit_scale_max=SCALE_CAP, precision=precision, block=block
    )
    out = {k: getattr(ref, k).cpu() for k in ("loss", "d_img", "d_txt", "d_scale")}
    out.update(loss_bound=ref.loss_bound, d_scale_bound=ref.d_scale_bound, precision=precision)
    return out


class Oracles:
    """The float64 truth per ``(B, D)``, computed on first use and kept for later rounds.

    Kept in memory (``files=None``) or in a file per ``(B, D)`` under ``files``, which
    worker processes load once their memory has been measured. ``precision`` is the one
    whose bounds are computed; ``None`` turns the check off (``--no-check``).
    """

    def __init__(self, device, seed: int, log_scale: float, precision, files: Path | None):
        self.device, self.seed, self.log_scale = device, seed, log_scale
        self.precision, self.files = precision, files
        self.cache: dict[tuple[int, int], tuple[dict | None, str | None]] = {}

    def get(self, batch: int, dim: int) -> tuple[dict | None, str | None]:
        """``(truth, None)`` in memory, ``(None, file)`` for workers, or ``(None, None)``."""
        if self.precision is None:
            return None, None
        if (batch, dim) not in self.cache:
            img, txt = make_inputs(batch, dim, self.seed, self.device)
            exact = truth(img, txt, self.log_scale, self.precision)
            del img, txt
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if self.files is None:
                self.cache[batch, dim] = (exact, None)
            else:
                path = str(self.files / f"oracle-{batch}-{dim}.pt")
                torch.save(exact, path)
                self.cache[batch, dim] = (None, path)
        return self.cache[batch, dim]


def bound_precision(precisions: list[str]) -> str:
    """The precision whose bounds the sweep computes (module docstring)."""
    return "ieee" if "ieee" in precisions else precisions[0]


def compare(precision: str, loss, d_img, d_txt, d_scale, exact: dict) -> dict:
    """``loss_diff``, ``grad_diff`` and the bounds' verdict (``note``) of one case."""
    loss, loss_exact = torch.as_tensor(loss).detach(), float(exact["loss"])
    out = dict(
        loss_diff=abs(float(loss) - loss_exact) / abs(loss_exact),
        grad_diff=max(
            _rel_max(d_img, exact["d_img"]),
            _rel_max(d_txt, exact["d_txt"]),
            _rel_max(d_scale, exact["d_scale"]),
        ),
        note="",
    )
    if precision == exact["precision"]:
        out["note"] = verdict(loss, d_scale, exact)
    return out


def verdict(loss, d_scale, exact: dict) -> str:
    """Whether the loss and the temperature's gradient lie within testing's bounds.

    The bounds are written relative to the float64 value (absolute where it is 0, as the
    temperature's gradient is when the scale is clamped), in the units of ``loss_diff``
    and ``grad_diff``.
    """
    parts, outside = [], []
    for name, ours, key in (("loss", loss, "loss"), ("d_scale", d_scale, "d_scale")):
        value = float(exact[key])
        bound, err = exact[f"{key}_bound"], testing.max_error(ours, exact[key])
        parts.append(f"{name} {_relative(bound, value):.1e}")
        if not err <= bound:  # NaN is outside
            off, limit = _relative(err, value), _relative(bound, value)
            outside.append(f"{name} off by {off:.1e} > {limit:.1e}")
    if outside:
        return f"{OUTSIDE}: " + ", ".join(outside)
    return f"{WITHIN} ({', '.join(parts)} relative)"


def _relative(x: float, value: float) -> float:
    return x / abs(value) if value != 0 else x


def _rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` (``max|a - b|`` when ``b`` is all zeros)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = float(b.abs().max())
    err = float((a - b).abs().max())
    return err / scale if scale > 0 else err
