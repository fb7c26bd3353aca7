"""Whether the second pass reproduced the first: each re-encoded micro-batch against its
cached features (``b x D`` work, or ``b x L x D`` for token latents).

The measure is ``rho``, the largest relative difference of one sample's features
(``||new_i - old_i|| / max(||new_i||, ||old_i||)``, over its real tokens for token latents).
With ``u`` the unit roundoff of the features' dtype (never finer than fp32's, in which the
loss computes) and ``D`` their width, docs/accumulate.md derives:

* ``rho <= (D / 2 + 1) * 2**-24`` (or ``2 u`` when coarser): each logit moves by at most
  ``4 s rho``, within the worst-case fp32 rounding of the ``D``-term product that forms it
  (``s gamma(2D + 4)``); or the features differ by an ulp of their own dtype. Quiet.
* ``rho <= sqrt(u)``: what two roundings of the towers can explain, but the gradient is off
  by about ``4 s rho`` relative, more than the loss's own rounding. Warns, once a process.
* above ``sqrt(u)``, NaN or inf: not rounding. The second pass computed another function
  (randomness not replayed, state changed between the calls): an error.
"""

from __future__ import annotations

import math
import warnings

import torch

_FP32 = 2.0**-24
#: Set after the first warning of this process; later mismatches below the error are quiet.
WARNED: set[str] = set()


def thresholds(dtype: torch.dtype, width: int) -> tuple[float, float]:
    """``(quiet up to, error above)`` for features of ``dtype`` and last dim ``width``."""
    u = max(torch.finfo(dtype).eps / 2, _FP32)
    quiet = max((width / 2 + 1) * _FP32, 2 * u)
    return quiet, max(math.sqrt(u), quiet)


def distance(new: torch.Tensor, old: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``rho`` (see the module docstring) as a 0-d tensor, without a host sync; ``inf``
    where one pass has NaN or inf and the other not the same value."""
    if new.numel() == 0 or (new.device.type == "cpu" and torch.equal(new, old)):
        return torch.zeros((), device=new.device)  # the usual case, at the cost of one pass
    new, old = new.detach().float(), old.float()
    if mask is not None:  # padding never reaches the loss
        keep = mask.bool()[..., None]
        new, old = new.where(keep, 0.0), old.where(keep, 0.0)
    finite = new.isfinite() & old.isfinite()
    lone = ~(finite | (new == old) | (new.isnan() & old.isnan()))  # non-finite in one pass
    new, old = new.where(finite, 0.0), old.where(finite, 0.0)
    scale = torch.maximum(new.abs().amax(), old.abs().amax()).clamp_min(_TINY)
    new, old = new / scale, old / scale  # norms of large features stay finite
    dims = tuple(range(1, new.dim()))
    norm = torch.maximum(new.norm(dim=dims), old.norm(dim=dims)).clamp_min(_TINY)
    rho = ((new - old).norm(dim=dims) / norm).amax()
    return rho.where(~lone.any(), math.inf)


class Replay:
    """Each re-encoded micro-batch against its cached features. Shapes are checked at
    once; the distances are judged together by :meth:`verdict`, in one host sync, so that
    the check never stalls the device between a micro-batch's forward and its backward
    (a failing micro-batch's gradients are discarded with the others')."""

    def __init__(self, rank: int):
        self.rank = rank
        self.pending: list[tuple] = []  # (micro-batch, name, quiet, error, value)

    def check(self, new: tuple, old: tuple, k: int) -> str | None:
        """Why ``new`` cannot stand for micro-batch ``k``'s cached ``old`` (``None`` if
        it may: its distance is then judged by :meth:`verdict`)."""
        where = _where(k)
        if len(new) != len(old):
            return f"{where} returned {len(new)} tensors, the first pass {len(old)}"
        for name, a, b in zip(_NAMES, new, old, strict=False):
            if a is None and b is None:  # no mask beside pooled texts and negatives
                continue
            if not isinstance(a, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
                got = f"{a.dtype} {tuple(a.shape)}" if isinstance(a, torch.Tensor) else type(a)
                return f"{where} gave {name} {got}, the first pass {b.dtype} {tuple(b.shape)}"
        if len(new) >= 3 and new[2] is not None:
            self.pending.append((k, _NAMES[2], 0.0, 0.0, (new[2] != old[2]).any().float()))
        mask = old[2] if len(old) >= 3 and old[1].dim() == 3 else None
        named = [(_NAMES[0], new[0], old[0], None), (_NAMES[1], new[1], old[1], mask)]
        if len(new) == 4:
            named.append((_NAMES[3], new[3], old[3], None))
        for name, a, b, m in named:
            quiet, error = thresholds(b.dtype, b.shape[-1])
            self.pending.append((k, name, quiet, error, distance(a, b, m)))
        return None

    def verdict(self) -> str | None:
        """The first micro-batch whose second pass computed another function, or ``None``;
        warns (once per process) of one that differs beyond fp32 rounding."""
        if not self.pending:
            return None
        values = torch.stack([v.to(self.pending[0][4].device) for *_, v in self.pending])
        for (k, name, quiet, error, _), rho in zip(self.pending, values.tolist(), strict=True):
            if name == _NAMES[2] and rho:
                return f"{_where(k)} gave another text mask than the first pass"
            if rho == math.inf:
                return f"{_where(k)} gave {name} with NaN or inf where the other pass's are finite"
            if rho > error:
                return (
                    f"{_where(k)} gave {name} that differ from the first pass's by rho = "
                    f"{rho:.2e} (largest relative difference of a sample), above the "
                    f"{error:.1e} rounding can explain: encode does not compute the same "
                    "function twice (randomness not from torch's global RNG, state that "
                    "changes between calls)"
                )
            if rho > quiet and "mismatch" not in WARNED:
                WARNED.add("mismatch")
                warnings.warn(
                    f"accumulate: {_where(k)} on rank {self.rank} gave {name} that differ "
                    f"from the first pass's by rho = {rho:.2e}, above the {quiet:.1e} of fp32 "
                    "rounding: the gradients differ from a plain step's by about 4 * "
                    "logit_scale * rho, relative (nondeterministic kernels?). Not repeated "
                    "in this process.",
                    UserWarning,
                    stacklevel=5,
                )
        return None


_NAMES = ("image features", "text features", "text mask", "text negatives")
_TINY = torch.finfo(torch.float32).tiny


def _where(k: int) -> str:
    return f"micro-batch {k} encoded again (second pass)"
