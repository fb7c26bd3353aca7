"""The float64 truth of the sigmoid (SigLIP) loss and bounds for fp32 results.

One pass over row blocks of the logits, each block with its targets
(:meth:`~palmtree.testing.problem.Problem.targets`, the entries with ``z = +1``, and the
ignored entries, which leave the sum):
:class:`_Sums` adds up the terms, their bounds and the gradients in block order, then
gives the loss's fields; the gradients' come from
:meth:`~palmtree.testing.problem.Problem.gradients`, shared with CLIP's truth.
"""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass

import torch

from .problem import Problem, softplus
from .rounding import OPERAND_UNIT, UNDERFLOW, UNIT_ROUNDOFF, LogitErrors, gamma


@dataclass
class SigLipTruth:
    """The float64 truth of the sigmoid loss's ``J = sum_r weights[r] * share_r`` (shares
    are the ranks' rows), with bounds for fp32 results and ``d_neg``, ``d_neg_size`` as
    :class:`ClipTruth`'s. ``loss_pos`` holds the terms with ``z = +1``, ``loss_neg`` those
    with ``z = -1``."""

    loss: torch.Tensor
    loss_pos: torch.Tensor
    loss_neg: torch.Tensor
    shares: torch.Tensor
    d_img: torch.Tensor
    d_txt: torch.Tensor
    d_scale: torch.Tensor
    d_bias: torch.Tensor
    loss_bound: float
    pos_bound: float
    neg_bound: float
    share_bounds: torch.Tensor
    d_scale_bound: float
    d_bias_bound: float
    d_img_size: float
    d_txt_size: float
    d_neg: InitVar[torch.Tensor]
    d_neg_size: InitVar[float]

    def __post_init__(self, d_neg: torch.Tensor, d_neg_size: float) -> None:
        # Attributes, not fields: without negatives ``d_neg`` is ``[0, D]``, and the
        # field-wise comparisons (``dataclasses.asdict``) take each field's largest entry.
        self.d_neg, self.d_neg_size = d_neg, d_neg_size


def siglip_truth(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: float,
    logit_bias: float,
    *,
    sizes: list[int] | None = None,
    weights: list[float] | None = None,
    logit_scale_max: float = math.inf,
    scale_cap: str = "clamp",
    normalize: bool = True,
    precision: str = "ieee",
    block: int | None = None,
    labels: torch.Tensor | None = None,
    same_label: str = "positive",
    negatives: torch.Tensor | None = None,
) -> SigLipTruth:
    """The float64 truth and fp32 bounds for ``siglip_loss`` on the global batch.

    ``L = 1/B sum_ij softplus(-z_ij (s <u_i, v_j> + bias))``, ``z`` +1 on the positives and
    -1 elsewhere. With ``labels`` (as :func:`clip_truth`'s) ``z`` is +1 wherever the two
    labels are equal under ``same_label="positive"``, the diagonal included; under
    ``"ignore"`` only on the diagonal, and the other equal-label pairs leave the sum.
    ``negatives`` (as :func:`clip_truth`'s) are extra columns of every row, ``z = -1``.
    The bounds follow the package docstring: each ``x = S + bias`` is off by ``E_ij + u
    |x|``, a term ``softplus(-z x)`` moves by ``sigmoid(-z x)`` times that and is formed to
    ``gamma(4)`` relative, ``G = -z sigmoid(-z x)`` by ``G (1 - sigmoid) dx`` plus
    ``gamma(3) |G|``, and sums add ``gamma(n)`` times their absolute sums; ignored entries
    are no terms and carry no error. Row blocks and the device as in :func:`clip_truth`.
    """
    p = Problem.of(
        img,
        txt,
        logit_scale,
        sizes=sizes,
        weights=weights,
        cap=logit_scale_max,
        scale_cap=scale_cap,
        normalize=normalize,
        block=block,
        labels=labels,
        same_label=same_label,
        negatives=negatives,
    )
    sums = _Sums(p, OPERAND_UNIT[precision], logit_bias)
    for i0, i1 in p.rows_of:
        sums.add_block(i0, i1)
    return SigLipTruth(
        **sums.losses(),
        **p.gradients(sums.d_u, sums.d_c, sums.g_dot, sums.ds_b),
        d_bias=torch.tensor(sums.g_sum, dtype=torch.float64, device=p.device),
        d_bias_bound=sums.db_b,
    )


class _Sums:
    """What the sigmoid truth adds up over row blocks: per row the terms and their
    bounds; the positives' and the negatives' terms and bounds apart; the gradients
    w.r.t. the unit rows, the scale and the bias, with the bounds of the last two."""

    def __init__(self, p: Problem, unit: float, bias: float):
        self.p, self.bias = p, bias
        self.err = LogitErrors(p.u, p.cols, p.s, p.dim, unit)
        self.w = p.row_weight / p.B  # each row's weight in J
        self.n_sum = p.n_cols + p.B + len(p.sizes) + 2  # terms in the longest sum of one value
        f64 = dict(dtype=torch.float64, device=p.device)
        self.row_terms = torch.zeros(p.B, **f64)
        self.row_term_bounds = torch.zeros(p.B, **f64)
        self.pos = self.neg = self.pos_b = self.neg_b = 0.0
        self.g_dot = self.g_sum = self.ds_b = self.db_b = 0.0
        self.d_u, self.d_c = torch.zeros_like(p.u), torch.zeros_like(p.cols)

    def add_block(self, i0: int, i1: int) -> None:
        """Rows ``[i0, i1)``: ``z`` is +1 at the block's targets, -1 elsewhere; the ignored
        entries' terms, bounds and gradients are 0."""
        p, block = self.p, self.p.targets(i0, i1)
        targets = block.index
        dot = p.dots(i0, i1)
        x = p.s * dot + self.bias
        z = -torch.ones_like(x)
        z[targets] = 1.0
        t = block.without_ignored(softplus(-z * x), 0.0)
        sig = block.without_ignored(torch.sigmoid(-z * x), 0.0)
        dx = self.err.block(i0, i1) + UNIT_ROUNDOFF * x.abs()
        t_err = block.without_ignored(sig * dx + gamma(4) * t + 4 * UNDERFLOW, 0.0)
        self.row_terms[i0:i1] = t.sum(1)
        self.row_term_bounds[i0:i1] = t_err.sum(1)
        off = torch.ones_like(t, dtype=torch.bool)
        off[targets] = False
        off = block.without_ignored(off, False)
        self.pos += float(t[targets].sum())
        self.neg += float(t[off].sum())  # summed apart: tiny negatives must not vanish in pos
        self.pos_b += float(t_err[targets].sum())
        self.neg_b += float(t_err[off].sum())
        g = self.w[i0:i1, None] * (-z * sig)
        self._add_gradients(i0, i1, dot, x, dx, g, sig, block)

    def _add_gradients(self, i0, i1, dot, x, dx, g, sig, block) -> None:
        """``G = dJ/dS`` of the block into the gradients, and the bounds on fp32's
        ``dJ/ds`` and ``dJ/dbias``: each ``G`` off by ``|G| ((1 - sig) dx + gamma(3))``."""
        p, n_sum = self.p, self.n_sum
        self.d_u[i0:i1] = p.s * g @ p.cols
        self.d_c += p.s * g.T @ p.u[i0:i1]
        self.g_dot += float((g * dot).sum())
        self.g_sum += float(g.sum())
        dg = block.without_ignored(g.abs() * ((1 - sig) * dx + gamma(3)) + 4 * UNDERFLOW, 0.0)
        dot_err = (g.abs() * (dx - UNIT_ROUNDOFF * x.abs())).sum() / p.s
        self.ds_b += float((dg * dot.abs()).sum() + dot_err)
        self.ds_b += gamma(n_sum) * float((g * dot).abs().sum())
        self.db_b += float(dg.sum()) + gamma(n_sum) * float(g.abs().sum())

    def losses(self) -> dict:
        """The truth's loss fields: the loss, its positive and negative parts, the shares,
        and their bounds."""
        B, sizes, n_sum = self.p.B, self.p.sizes, self.n_sum
        f64 = dict(dtype=torch.float64, device=self.p.device)
        total = float(self.row_terms.sum())
        share_terms = torch.stack([part.sum() for part in self.row_terms.split(sizes)])
        share_bounds = torch.stack(
            [
                (b.sum() + gamma(n_sum) * t) / B
                for b, t in zip(self.row_term_bounds.split(sizes), share_terms, strict=True)
            ]
        )
        return dict(
            loss=torch.tensor(total / B, **f64),
            loss_pos=torch.tensor(self.pos / B, **f64),
            loss_neg=torch.tensor(self.neg / B, **f64),
            shares=share_terms / B,
            loss_bound=(float(self.row_term_bounds.sum()) + gamma(n_sum) * total) / B,
            pos_bound=(self.pos_b + gamma(n_sum) * self.pos) / B,
            neg_bound=(self.neg_b + gamma(n_sum) * self.neg) / B,
            share_bounds=share_bounds,
        )
