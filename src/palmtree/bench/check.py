"""The bench's correctness columns: each case against ``palmtree.testing``'s float64 truth.

``loss_diff = |loss - L| / |L|`` (``|loss - L|`` where ``L`` is 0, as the CLIP loss of
one pair is) and ``grad_diff``, the largest of ``max|g - g*| / max|g*|``
over the image features, the text features, the extra negatives (``--negatives``), the
log-temperature and (SigLIP) the bias, where ``L, g*`` come from
:func:`palmtree.testing.clip_truth` (CLIP, on the bench's device) or
:func:`palmtree.testing.siglip_truth` (SigLIP, on the CPU) on the same inputs, the same
labels and the same negatives (:func:`~palmtree.bench.cases.make_targets`), computed once
per ``(B, D)``.

The truth also bounds the error that an fp32 computation of the loss and of the
gradients of the scalar inputs may have (docs/design.md, "What exact means"); a row's
``note`` says whether they lie within those bounds. The bound depends on the operand precision,
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
from .cases import SCALAR_GRADS, SCALE_CAP, SIGLIP_BIAS, make_inputs, make_targets
from .targets import NO_TARGETS, TargetSpec

#: How a row's note begins when its loss and temperature gradient are within the bounds,
#: and when one of them is not.
WITHIN = "within the fp32 bounds"
OUTSIDE = "OUTSIDE the fp32 bounds"


def truth(
    img: torch.Tensor,
    txt: torch.Tensor,
    log_scale: float,
    precision: str,
    loss: str = "clip",
    logit_bias: float = SIGLIP_BIAS,
    extras: dict | None = None,
    same_label: str = "positive",
) -> dict:
    """The float64 loss and gradients of ``img, txt`` and the fp32 bounds, for ``loss``.

    ``extras`` are the loss's ``labels`` and ``text_negatives``
    (:func:`~palmtree.bench.cases.make_targets`), counted as ``same_label`` says. Keys:
    ``loss``, the gradients ``d_img``, ``d_txt``, ``d_neg`` (with negatives) and those of
    the scalar inputs (``d_scale``, and ``d_bias`` for ``siglip``:
    :data:`~.cases.SCALAR_GRADS`), each scalar's ``<name>_bound``, ``precision`` and
    ``loss_kind``; tensors on the CPU. The CLIP truth runs on the inputs' device, on CUDA
    in row blocks of 256 MB (the default blocks of 32 MB would mean thousands of small
    launches at the GPU sizes); ``testing.siglip_truth`` runs on the CPU.
    """
    extras = extras or {}
    labels, neg = extras.get("labels"), extras.get("text_negatives")
    targets = dict(labels=labels, same_label=same_label, negatives=neg)
    if loss == "siglip":
        img, txt = img.cpu(), txt.cpu()
        targets.update({k: v.cpu() for k, v in targets.items() if isinstance(v, torch.Tensor)})
        ref = testing.siglip_truth(
            img,
            txt,
            log_scale,
            logit_bias,
            logit_scale_max=SCALE_CAP,
            precision=precision,
            **targets,
        )
    else:
        big = max(len(img) + (0 if neg is None else len(neg)), 1)
        block = max(1, (1 << 25) // big) if img.is_cuda else None
        ref = testing.clip_truth(
            img,
            txt,
            log_scale,
            logit_scale_max=SCALE_CAP,
            precision=precision,
            block=block,
            **targets,
        )
    names = ("loss", "d_img", "d_txt", *SCALAR_GRADS[loss], *(() if neg is None else ("d_neg",)))
    out = {k: getattr(ref, k).cpu() for k in names}
    out.update({f"{k}_bound": getattr(ref, f"{k}_bound") for k in ("loss", *SCALAR_GRADS[loss])})
    out.update(precision=precision, loss_kind=loss)
    return out


class Oracles:
    """The float64 truth per ``(B, D)``, computed on first use and kept for later rounds.

    Kept in memory (``files=None``) or in a file per ``(B, D)`` under ``files``, which
    worker processes load once their memory has been measured. ``precision`` is the one
    whose bounds are computed; ``None`` turns the check off (``--no-check``). ``loss``
    and ``logit_bias`` say which loss, ``targets`` the labels and negatives
    (:func:`truth`).
    """

    def __init__(
        self,
        device,
        seed: int,
        log_scale: float,
        precision,
        files: Path | None,
        loss: str = "clip",
        logit_bias: float = SIGLIP_BIAS,
        targets: TargetSpec = NO_TARGETS,
    ):
        self.device, self.seed, self.log_scale = device, seed, log_scale
        self.precision, self.files = precision, files
        self.loss, self.logit_bias, self.targets = loss, logit_bias, targets
        self.cache: dict[tuple[int, int], tuple[dict | None, str | None]] = {}

    def get(self, batch: int, dim: int) -> tuple[dict | None, str | None]:
        """``(truth, None)`` in memory, ``(None, file)`` for workers, or ``(None, None)``."""
        if self.precision is None:
            return None, None
        if (batch, dim) not in self.cache:
            img, txt = make_inputs(batch, dim, self.seed, self.device)
            extras = make_targets(self.targets, batch, dim, self.seed, self.device)
            exact = truth(
                img,
                txt,
                self.log_scale,
                self.precision,
                self.loss,
                self.logit_bias,
                extras,
                self.targets.same_label,
            )
            del img, txt, extras
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


def compare(precision: str, loss, grads: dict, exact: dict) -> dict:
    """``loss_diff``, ``grad_diff`` and the bounds' verdict (``note``) of one case.

    ``grads`` maps ``d_img``, ``d_txt``, ``d_neg`` (with negatives) and the scalar inputs'
    gradient names to the case's gradients; ``exact`` is :func:`truth`'s dict. No
    negatives (``round(R * B) = 0``) have no gradient to compare.
    """
    loss, loss_exact = torch.as_tensor(loss).detach(), float(exact["loss"])
    names = ("d_img", "d_txt", *SCALAR_GRADS[exact["loss_kind"]])
    if "d_neg" in exact and exact["d_neg"].numel():
        names += ("d_neg",)
    out = dict(
        loss_diff=_relative(abs(float(loss) - loss_exact), loss_exact),
        grad_diff=max(_rel_max(grads[k], exact[k]) for k in names),
        note="",
    )
    if precision == exact["precision"]:
        out["note"] = verdict(loss, grads, exact)
    return out


def verdict(loss, grads: dict, exact: dict) -> str:
    """Whether the loss and the scalar inputs' gradients lie within testing's bounds.

    The bounds are written relative to the float64 value (absolute where it is 0, as the
    temperature's gradient is when the scale is clamped), in the units of ``loss_diff``
    and ``grad_diff``.
    """
    parts, outside = [], []
    values = dict(grads, loss=loss)
    for name in ("loss", *SCALAR_GRADS[exact["loss_kind"]]):
        value = float(exact[name])
        bound, err = exact[f"{name}_bound"], testing.max_error(values[name], exact[name])
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
