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
from ..targets import Targets


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


def _unit(x, normalize: bool) -> torch.Tensor:
    return unit_rows_differentiable(x) if normalize else x.float()


def _columns(v, negatives, layout: Layout, normalize: bool) -> torch.Tensor:
    """Every rank's texts, then every rank's extra negatives (all with their gradients)."""
    v_all = gather_rows_with_grad(v, layout)
    if negatives is None:
        return v_all
    n_all = gather_rows_with_grad(_unit(negatives, normalize), layout.negatives)
    return torch.cat([v_all, n_all])


def _masks(targets: Targets | None, layout: Layout, n_columns: int, device):
    """``(own, same_off)`` of this rank's rows against every column (``same_off``
    ``None`` without labels)."""
    offset, b = layout.offset, layout.b_local
    rows = torch.arange(offset, offset + b, device=device)
    own = rows[:, None] == torch.arange(n_columns, device=device)[None, :]
    if targets is None:
        return own, None
    return own, targets.same(targets.rows(offset, b), 0, n_columns) & ~own


def target_nll_sum(logits, own, same_off, targets: Targets | None, offset: int) -> torch.Tensor:
    """The rows' ``-log`` target probabilities: :func:`nll_sum` at the own pair, with
    ignored pairs out of the softmax; with same-item positives, the log-sum-exp of each
    row measured against its mean logit over its targets (at least ``log |P| > 0`` where
    there are several, so no small loss loses its digits)."""
    labels = torch.arange(offset, offset + logits.shape[0], device=logits.device)
    if same_off is None:
        return nll_sum(logits, labels)
    if targets.ignore:
        return nll_sum(logits.masked_fill(same_off, torch.finfo(logits.dtype).min), labels)
    at = own | same_off
    count = at.sum(1)
    # Differences to the own pair's logit first: a mean of logits of size ``scale``
    # subtracted from them would cancel for near-duplicates.
    diffs = logits - logits.gather(1, labels[:, None])
    spread = (diffs * at).sum(1) / count
    several = torch.logsumexp(diffs - spread[:, None], dim=1)
    one = count == 1
    single = nll_sum(logits[one], labels[one]) if bool(one.any()) else logits.new_zeros(())
    return single + several[~one].sum()


def _hits(logits, own, same_off, targets) -> torch.Tensor:
    """Rows whose largest allowed logit is at a target."""
    if not logits.shape[0]:
        return logits.new_zeros(())
    at = own if same_off is None or targets.ignore else own | same_off
    allowed = (
        logits
        if same_off is None or not targets.ignore
        else logits.masked_fill(same_off, -torch.inf)
    )
    best_target = allowed.masked_fill(~at, -torch.inf).amax(1)
    return (best_target >= allowed.amax(1)).sum().float()


def reference_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    negatives: torch.Tensor | None,
    scale: torch.Tensor,
    layout: Layout,
    precision: str,
    normalize: bool,
    targets: Targets | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :class:`palmtree.protocol.SinglePassLoss`: ``(N * share_r, sums)``.

    Rank ``r`` computes its image rows against every text and extra negative, and its
    text rows against every image (texts are the only text-side queries)."""
    u, v = _unit(image, normalize), _unit(text, normalize)
    B = layout.b_global
    u_all = gather_rows_with_grad(u, layout)
    v_cols = _columns(v, negatives, layout, normalize)
    uq, vq = _round_operand(u, precision), _round_operand(v, precision)
    image_rows = scale * uq @ _round_operand(v_cols, precision).T  # S[offset:offset+b, :]
    text_rows = scale * vq @ _round_operand(u_all, precision).T  # S[:, offset:offset+b]^T
    own, same_off = _masks(targets, layout, v_cols.shape[0], u.device)
    own_t, same_t = own[:, :B], None if same_off is None else same_off[:, :B]
    row_sum = target_nll_sum(image_rows, own, same_off, targets, layout.offset)
    col_sum = target_nll_sum(text_rows, own_t, same_t, targets, layout.offset)
    share = (row_sum + col_sum) / (2 * B)

    with torch.no_grad():
        sums = torch.zeros(4, dtype=torch.float32, device=u.device)
        sums[0], sums[1] = row_sum.detach(), col_sum.detach()
        sums[2] = _hits(image_rows, own, same_off, targets)
        sums[3] = _hits(text_rows, own_t, same_t, targets)
        sums = all_reduce(sums, layout)
    return layout.world_size * share, sums


def reference_sigmoid_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    negatives: torch.Tensor | None,
    scale: torch.Tensor,
    bias: torch.Tensor,
    layout: Layout,
    precision: str,
    normalize: bool,
    targets: Targets | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sigmoid loss with materialised logits: the contract of
    :class:`palmtree.protocol.SigmoidPassLoss`, ``(N * share_r, sums)``."""
    u, v = _unit(image, normalize), _unit(text, normalize)
    B = layout.b_global
    v_cols = _columns(v, negatives, layout, normalize)
    logits = scale * _round_operand(u, precision) @ _round_operand(v_cols, precision).T
    own, same_off = _masks(targets, layout, v_cols.shape[0], u.device)
    ignore = same_off is not None and targets.ignore
    positive = own if same_off is None or ignore else own | same_off
    x = logits + bias
    terms = F.softplus(torch.where(positive, -x, x))
    if ignore:
        terms = terms.masked_fill(same_off, 0.0)
    pos = terms.masked_fill(~positive, 0.0).sum()
    neg = terms.masked_fill(positive, 0.0).sum()
    share = (pos + neg) / B

    with torch.no_grad():
        u_all = gather_rows(u.detach(), layout)
        text_rows = scale * _round_operand(v, precision) @ _round_operand(u_all, precision).T
        sums = torch.stack([pos.detach(), neg.detach(), pos.new_zeros(()), pos.new_zeros(())])
        sums[2] = _hits(logits, own, same_off, targets)
        sums[3] = _hits(
            text_rows, own[:, :B], None if same_off is None else same_off[:, :B], targets
        )
        sums = all_reduce(sums, layout)
    return layout.world_size * share, sums
