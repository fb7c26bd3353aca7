"""What both float64 truths start from: the split, the weights, the scale, the unit rows.

A :class:`Problem` is the global batch in float64 with everything the truths share: each
row's upstream weight, the scale and whether its cap stops the gradient, the unit
features (and the divisors their gradient goes back through), the row blocks the passes
walk, each block's logits and targets, and the last step both truths take: from the
gradients w.r.t. the unit rows and the scale to those w.r.t. the raw features and the
*log* scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..normalize import NORM_EPS
from .rounding import gamma
from .targets import Targets, block_targets


@dataclass
class Problem:
    """The global batch in float64 and what the truths derive from it (module docstring).

    ``capped``: the scale sits above its cap under ``scale_cap="clamp"``, so the log
    scale gets no gradient. ``divisors`` is ``None`` when the features are used as given.
    """

    B: int
    dim: int
    device: torch.device
    sizes: list[int]
    row_weight: torch.Tensor
    raw_scale: float
    s: float
    capped: bool
    u: torch.Tensor
    v: torch.Tensor
    divisors: tuple | None
    rows_of: list[tuple[int, int]]

    @classmethod
    def of(
        cls, img, txt, logit_scale, *, sizes, weights, cap, scale_cap, normalize, block
    ) -> Problem:
        """The problem of ``img``/``txt`` split as ``sizes`` with the ranks' ``weights``,
        in row blocks of ``block`` rows (default: about ``2**22`` logits each)."""
        img, txt = img.detach(), txt.detach()
        B, dim = img.shape
        dev = img.device
        sizes = [B] if sizes is None else list(sizes)
        if sum(sizes) != B:
            raise ValueError(f"sizes {sizes} do not add up to the batch of {B}")
        weights = [1.0] * len(sizes) if weights is None else weights
        weights = torch.as_tensor(weights, dtype=torch.float64, device=dev)
        owner = torch.repeat_interleave(
            torch.arange(len(sizes), device=dev), torch.tensor(sizes, device=dev)
        )
        raw_scale = math.exp(logit_scale)
        if normalize:
            (u, u_div), (v, v_div) = _unit(img), _unit(txt)
            divisors = (u_div, v_div)
        else:
            u, v, divisors = img.double(), txt.double(), None
        block = block or max(1, (1 << 22) // max(B, 1))
        rows_of = [(i0, min(i0 + block, B)) for i0 in range(0, B, block)]
        capped = scale_cap == "clamp" and raw_scale > cap
        s = min(raw_scale, cap)
        return cls(
            B, dim, dev, sizes, weights[owner], raw_scale, s, capped, u, v, divisors, rows_of
        )

    def targets(self, i0: int, i1: int) -> Targets:
        """The targets of rows ``[i0, i1)``, image rows or text rows alike: every pass asks
        here, so a rule other than the diagonal is one change."""
        return block_targets(i0, i1, self.device)

    def target_dots(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Each row of ``a``'s similarity with its target row of ``b`` (``a = U, b = V``:
        each image's with its text): what the temperature's gradient measures the row's
        other similarities against."""
        rows, cols = self.targets(0, len(a)).index
        return torch.linalg.vecdot(a[rows], b[cols])

    def dots(self, i0: int, i1: int) -> torch.Tensor:
        """The similarities ``U V^T`` of image rows ``[i0, i1)`` with every text column
        (where extra negative columns would be appended)."""
        return self.u[i0:i1] @ self.v.T

    def row_logits(self, i0: int, i1: int) -> torch.Tensor:
        """``(s U) V^T`` of image rows ``[i0, i1)``: the CLIP forward's logits. Formed as
        ``s * dots`` they would round differently; each pass keeps its one formation."""
        return self.s * self.u[i0:i1] @ self.v.T

    def col_logits(self, j0: int, j1: int) -> torch.Tensor:
        """``(s V) U^T`` of text rows ``[j0, j1)``, the text-to-image direction's logits
        (only the texts are its queries: it never sees extra columns)."""
        return self.s * self.v[j0:j1] @ self.u.T

    def gradients(self, d_u, d_v, d_s: float, d_s_bound: float) -> dict:
        """The truth's gradient fields from ``dJ/dU``, ``dJ/dV``, ``dJ/ds`` and the bound
        on fp32's ``dJ/ds``: ``d_img``, ``d_txt``, ``d_scale`` (w.r.t. the log scale, 0
        with a 0 bound when :attr:`capped`), ``d_scale_bound``, ``d_img_size``, ``d_txt_size``."""
        if self.capped:
            d_scale, d_scale_bound = 0.0, 0.0
        else:  # d/dtheta = exp(theta) * dJ/ds (straight-through: exp's gradient, uncapped)
            d_scale = self.raw_scale * d_s
            d_scale_bound = self.raw_scale * d_s_bound + gamma(3) * abs(d_scale)
        d_img, d_txt = self.input_grads(d_u, d_v)
        d_img_size, d_txt_size = self.input_sizes(d_u, d_v)
        return dict(
            d_img=d_img,
            d_txt=d_txt,
            d_scale=torch.tensor(d_scale, dtype=torch.float64, device=self.device),
            d_scale_bound=d_scale_bound,
            d_img_size=d_img_size,
            d_txt_size=d_txt_size,
        )

    def input_grads(self, d_u, d_v):
        """Gradients w.r.t. the unit rows turned into those w.r.t. the raw features."""
        if self.divisors is None:
            return d_u, d_v
        return _unit_backward(d_u, self.u, self.divisors[0]), _unit_backward(
            d_v, self.v, self.divisors[1]
        )

    def input_sizes(self, d_u, d_v) -> tuple[float, float]:
        """The largest entry of each raw-feature gradient before the normalisation's
        projection, ``|dJ/du| / divisor``: what that projection's fp32 rounding is
        relative to (:class:`~palmtree.testing.ClipTruth`'s ``d_img_size``)."""
        grads = (
            (d_u, d_v)
            if self.divisors is None
            else (d_u / self.divisors[0], d_v / self.divisors[1])
        )
        return tuple(float(g.abs().max()) if g.numel() else 0.0 for g in grads)


def _unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 unit rows (eps ``NORM_EPS``, as the loss) and the divisor of each row."""
    x = x.double()
    peak = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    norm = torch.linalg.vector_norm(x / peak, dim=1, keepdim=True) * peak
    divisor = norm.clamp_min(NORM_EPS)
    return x / divisor, divisor


def _unit_backward(grad, u, divisor):
    dot = (u * grad).sum(1, keepdim=True) * (divisor > NORM_EPS)
    return (grad - u * dot) / divisor


def softplus(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(x))`` to the dtype's accuracy everywhere (``F.softplus`` returns ``x``
    itself above 20, off by ``exp(-x)``: 2e-9, far above float64's rounding)."""
    return x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))
