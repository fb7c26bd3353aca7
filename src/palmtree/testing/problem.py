"""What both float64 truths start from: the split, the weights, the scale, the unit rows.

A :class:`Problem` is the global batch in float64 with everything the truths share: each
row's upstream weight, the scale and whether its cap stops the gradient, the unit
features (and the divisors their gradient goes back through), the columns the image rows
are compared with (the ``B`` texts, then any extra negatives), the row blocks the passes
walk, each block's logits and targets (from the pairs' labels, where given), and the last
step both truths take: from the gradients w.r.t. the unit rows and the scale to those
w.r.t. the raw features and the *log* scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..normalize import NORM_EPS
from .rounding import gamma
from .targets import SAME_LABEL, Targets, block_targets


@dataclass
class Problem:
    """The global batch in float64 and what the truths derive from it (module docstring).

    ``capped``: the scale sits above its cap under ``scale_cap="clamp"``, so the log
    scale gets no gradient. ``cols``: the unit texts (``v``, its first ``B`` rows), then
    the unit negatives. ``divisors`` (of ``u`` and of ``cols``) is ``None`` when the
    features are used as given. ``labels``: one id per pair, ``None`` when all differ.
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
    cols: torch.Tensor
    divisors: tuple | None
    rows_of: list[tuple[int, int]]
    labels: torch.Tensor | None
    same_label: str

    @classmethod
    def of(
        cls,
        img,
        txt,
        logit_scale,
        *,
        sizes,
        weights,
        cap,
        scale_cap,
        normalize,
        block,
        labels=None,
        same_label="positive",
        negatives=None,
    ) -> Problem:
        """The problem of ``img``/``txt`` split as ``sizes`` with the ranks' ``weights``,
        the pairs' ``labels`` under ``same_label`` and the extra ``negatives``
        (:func:`~palmtree.testing.clip_truth`), in row blocks of ``block`` rows (default:
        about ``2**22`` logits each)."""
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
        columns = _columns(txt, negatives, dim)
        if normalize:
            (u, u_div), (c, c_div) = _unit(img), _unit(columns)
            divisors = (u_div, c_div)
        else:
            u, c, divisors = img.double(), columns.double(), None
        block = block or max(1, (1 << 22) // max(len(c), 1))
        capped = scale_cap == "clamp" and raw_scale > cap
        return cls(
            B=B,
            dim=dim,
            device=dev,
            sizes=sizes,
            row_weight=weights[owner],
            raw_scale=raw_scale,
            s=min(raw_scale, cap),
            capped=capped,
            u=u,
            v=c[:B],
            cols=c,
            divisors=divisors,
            rows_of=[(i0, min(i0 + block, B)) for i0 in range(0, B, block)],
            labels=_labels(labels, same_label, B, dev),
            same_label=same_label,
        )

    @property
    def n_cols(self) -> int:
        """How many columns each image row has: the ``B`` texts and the negatives."""
        return len(self.cols)

    def targets(self, i0: int, i1: int) -> Targets:
        """The targets of rows ``[i0, i1)``, image rows or text rows alike: every pass asks
        here, so the rule (:mod:`.targets`) is in one place."""
        if self.labels is None:
            return block_targets(i0, i1, self.device)
        return block_targets(i0, i1, self.device, self.labels, self.same_label)

    def target_dots(self, a: torch.Tensor, b: torch.Tensor):
        """Each row of ``a``'s mean similarity with its target rows of ``b`` (``a = U, b = V``:
        each image's with its texts), what the temperature's gradient measures the row's
        other similarities against, and each row's number of targets. A lone target's
        similarity is its own dot product; several come from the block's product."""
        means, counts = [], []
        for i0, i1 in self.rows_of:
            t = self.targets(i0, i1)
            rows, cols = t.index
            if t.weight is None or bool((t.weight == 1.0).all()):
                dots = torch.linalg.vecdot(a[i0 + rows], b[cols])
            else:
                dots = (a[i0:i1] @ b.T)[rows, cols]
            means.append(t.mean(dots, i1 - i0))
            counts.append(torch.bincount(rows, minlength=i1 - i0))
        return torch.cat(means), torch.cat(counts)

    def dots(self, i0: int, i1: int) -> torch.Tensor:
        """The similarities ``U C^T`` of image rows ``[i0, i1)`` with every column: the
        texts, then the negatives."""
        return self.u[i0:i1] @ self.cols.T

    def row_logits(self, i0: int, i1: int) -> torch.Tensor:
        """``(s U) C^T`` of image rows ``[i0, i1)``: the CLIP forward's logits. Formed as
        ``s * dots`` they would round differently; each pass keeps its one formation."""
        return self.s * self.u[i0:i1] @ self.cols.T

    def col_logits(self, j0: int, j1: int) -> torch.Tensor:
        """``(s V) U^T`` of text rows ``[j0, j1)``, the text-to-image direction's logits
        (only the texts are its queries: it never sees the negatives)."""
        return self.s * self.v[j0:j1] @ self.u.T

    def gradients(self, d_u, d_c, d_s: float, d_s_bound: float) -> dict:
        """The truth's gradient fields from ``dJ/dU``, ``dJ/dC`` (the texts', then the
        negatives'), ``dJ/ds`` and the bound on fp32's ``dJ/ds``: ``d_img``, ``d_txt``,
        ``d_neg``, ``d_scale`` (w.r.t. the log scale, 0 with a 0 bound when
        :attr:`capped`), ``d_scale_bound``, ``d_img_size``, ``d_txt_size``, ``d_neg_size``."""
        if self.capped:
            d_scale, d_scale_bound = 0.0, 0.0
        else:  # d/dtheta = exp(theta) * dJ/ds (straight-through: exp's gradient, uncapped)
            d_scale = self.raw_scale * d_s
            d_scale_bound = self.raw_scale * d_s_bound + gamma(3) * abs(d_scale)
        d_img, d_cols = self.input_grads(d_u, d_c)
        d_img_size, d_txt_size, d_neg_size = self.input_sizes(d_u, d_c)
        return dict(
            d_img=d_img,
            d_txt=d_cols[: self.B],
            d_neg=d_cols[self.B :],
            d_scale=torch.tensor(d_scale, dtype=torch.float64, device=self.device),
            d_scale_bound=d_scale_bound,
            d_img_size=d_img_size,
            d_txt_size=d_txt_size,
            d_neg_size=d_neg_size,
        )

    def input_grads(self, d_u, d_c):
        """Gradients w.r.t. the unit rows turned into those w.r.t. the raw features."""
        if self.divisors is None:
            return d_u, d_c
        return _unit_backward(d_u, self.u, self.divisors[0]), _unit_backward(
            d_c, self.cols, self.divisors[1]
        )

    def input_sizes(self, d_u, d_c) -> tuple[float, float, float]:
        """The largest entry of each raw-feature gradient (images, texts, negatives) before
        the normalisation's projection, ``|dJ/du| / divisor``: what that projection's fp32
        rounding is relative to (:class:`~palmtree.testing.ClipTruth`'s ``d_img_size``)."""
        if self.divisors is not None:
            d_u, d_c = d_u / self.divisors[0], d_c / self.divisors[1]
        grads = (d_u, d_c[: self.B], d_c[self.B :])
        return tuple(float(g.abs().max()) if g.numel() else 0.0 for g in grads)


def _columns(txt: torch.Tensor, negatives, dim: int) -> torch.Tensor:
    """The texts, then the extra ``negatives`` (``[Nn, D]``, ``Nn`` may be 0; ``None``:
    none): every column an image row is compared with, before normalisation."""
    if negatives is None:
        return txt
    if negatives.ndim != 2 or negatives.shape[1] != dim:
        raise ValueError(f"negatives must be [Nn, {dim}], got {list(negatives.shape)}")
    if len(negatives) == 0:
        return txt
    negatives = negatives.detach().to(txt.device, torch.float64)
    return torch.cat([txt.double(), negatives])


def _labels(labels, same_label: str, B: int, device) -> torch.Tensor | None:
    """``labels`` checked: integer ids, one per pair of the global batch (``None``: all
    pairs differ, and ``same_label`` says nothing)."""
    if labels is None:
        return None
    if same_label not in SAME_LABEL:
        raise ValueError(f"same_label must be one of {SAME_LABEL}, got {same_label!r}")
    labels = torch.as_tensor(labels, device=device)
    if labels.shape != (B,) or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be {B} integer ids, got {labels.dtype} {list(labels.shape)}")
    return labels


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
