"""The readable backend: materialised logits and autograd through differentiable gathers.

Both the images and the texts are gathered with a gather whose backward sums every
rank's gradient (:func:`palmtree.collectives.gather_rows_with_grad`); rank ``r``
computes its own rows and its own columns of the global logits (two ``b x B``
blocks) and plain cross-entropies. Autograd does the rest, which makes this the
oracle the single-pass backends are tested against. Memory is O(b * B).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..collectives import all_reduce, gather_rows, gather_rows_with_grad
from ..distributed import Layout
from ..normalize import unit_rows_differentiable
from ..precision import rounded


def _round_operand(x: torch.Tensor, precision: str) -> torch.Tensor:
    """Rounds operands like the single-pass kernels do; the gradient passes straight through."""
    if precision == "ieee":
        return x
    # Straight through: a plain cast's backward would round the gradient as well.
    return x + (rounded(x.detach(), precision) - x.detach())


def nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``sum_i cross_entropy(logits[i], labels[i])``, each term to relative accuracy.

    ``-log softmax = softplus(logsumexp_{j != label} (logit_j - logit_label))``: no
    ``lse - logit`` cancellation at magnitude ``scale``, so a small loss keeps its digits.
    The label's own entry is masked with the dtype's lowest finite value, not ``-inf``, so
    that a row with no negatives (a global batch of one) has a zero, not NaN, gradient.
    """
    positive = logits.gather(1, labels[:, None])
    others = (logits - positive).scatter(1, labels[:, None], torch.finfo(logits.dtype).min)
    return F.softplus(torch.logsumexp(others, dim=1)).sum()


def reference_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    layout: Layout,
    precision: str,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :class:`palmtree.protocol.SinglePassLoss`: ``(N * share_r, sums)``."""
    u = unit_rows_differentiable(image) if normalize else image.float()
    v = unit_rows_differentiable(text) if normalize else text.float()
    offset, b, B = layout.offset, layout.b_local, layout.b_global
    u_all = gather_rows_with_grad(u, layout)
    v_all = gather_rows_with_grad(v, layout)
    uq, vq = _round_operand(u, precision), _round_operand(v, precision)
    image_rows = scale * uq @ _round_operand(v_all, precision).T  # S[offset:offset+b, :]
    text_rows = scale * vq @ _round_operand(u_all, precision).T  # S[:, offset:offset+b]^T
    labels = torch.arange(offset, offset + b, device=u.device)
    row_sum = nll_sum(image_rows, labels)
    col_sum = nll_sum(text_rows, labels)
    share = (row_sum + col_sum) / (2 * B)

    with torch.no_grad():
        sums = torch.zeros(4, dtype=torch.float32, device=u.device)
        sums[0], sums[1] = row_sum.detach(), col_sum.detach()
        if b:
            for k, rows in ((2, image_rows), (3, text_rows)):
                positives = rows.gather(1, labels[:, None]).squeeze(1)
                sums[k] = (positives >= rows.amax(1)).sum()
        sums = all_reduce(sums, layout)
    return layout.world_size * share, sums


def reference_sigmoid_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    layout: Layout,
    precision: str,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sigmoid loss with materialised logits: the contract of
    :class:`palmtree.protocol.SigmoidPassLoss`, ``(N * share_r, sums)``."""
    u = unit_rows_differentiable(image) if normalize else image.float()
    v = unit_rows_differentiable(text) if normalize else text.float()
    offset, b, B = layout.offset, layout.b_local, layout.b_global
    v_all = gather_rows_with_grad(v, layout)
    logits = scale * _round_operand(u, precision) @ _round_operand(v_all, precision).T
    rows = torch.arange(b, device=u.device)
    positive = torch.zeros_like(logits, dtype=torch.bool)
    positive[rows, offset + rows] = True
    x = logits + bias
    terms = F.softplus(torch.where(positive, -x, x))
    pos = terms[rows, offset + rows].sum()  # the positives in row order, as a mask gives them
    neg = terms.masked_fill(positive, 0.0).sum()
    share = (pos + neg) / B

    with torch.no_grad():
        u_all = gather_rows(u.detach(), layout)
        text_rows = scale * _round_operand(v, precision) @ _round_operand(u_all, precision).T
        sums = torch.stack([pos.detach(), neg.detach(), pos.new_zeros(()), pos.new_zeros(())])
        if b:
            for k, block in ((2, logits), (3, text_rows)):
                sums[k] = (block[rows, offset + rows] >= block.amax(1)).sum()
        sums = all_reduce(sums, layout)
    return layout.world_size * share, sums
