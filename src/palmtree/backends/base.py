"""The contract between the distributed protocol and a kernel backend.

A kernel backend sees one rank's slice of the global logits and nothing else:

    S = scale * U @ V^T        U: [b, D] this rank's unit image rows (fp32)
                               V: [B, D] every rank's unit text rows (fp32)

Row ``i`` of ``U`` is global pair ``offset + i``, so its positive is column
``offset + i``. Kernels never talk to other ranks; :mod:`palmtree.protocol` does
the gathers, the column all-reduces and the reduce-scatter around them.

``forward`` returns the statistics of the local rows as (max, sum of exp) pairs in which
the sum leaves out the positive, and the positives themselves. ``backward`` is given
:class:`GradientTerms`, a shift and a coefficient for every local row and every global
column, and builds

    G[i, j] = row_coef[i] * exp(S[i, j] - row_shift[i])
            + col_coef[j] * exp(S[i, j] - col_shift[j])        (j != offset + i)
    G[i, offset + i] = pos_grad[i]

then returns ``dU = scale * G @ V``, ``dV = scale * G^T @ U`` (this rank's partial for
every column; the protocol sums the partials across ranks) and, with ``dot = U V^T``,

    dscale = sum_{j != offset + i}   row_coef[i] exp(S[i, j] - row_shift[i]) (dot[i, j] - d[i])
                                   + col_coef[j] exp(S[i, j] - col_shift[j]) (dot[i, j] - c[j])

where ``c = pair_dot`` holds ``<u_k, v_k>`` of every global pair ``k`` and
``d[i] = c[offset + i]`` (no division by ``scale``, which may be 0). With the protocol's
coefficients each softmax sums to one and ``pos_grad`` is ``G`` at the positive, formed
by the protocol from the forward's negatives' sums (:func:`palmtree.clip_terms.
gradient_terms`: at a peaked softmax ``p - w`` formed from ``p`` would cancel), so this
is ``sum_ij G[i, j] dot[i, j]`` with each positive's term spread over its row's and its
column's differences. It is formed so because at a peaked softmax ``sum G * dot`` adds
terms of size ``weight`` that cancel to ``weight * loss`` (``eps / loss`` relative
accuracy: a sign can flip), while here every term of a peaked row has the same sign. Each
difference carries its two dots' rounding anyway, so ``pair_dot`` may round differently
from the tiles' products; the positive's own term is therefore left out, not formed as a
difference that would not be exactly 0.

Two rules keep ``G`` exact where it cancels (docs/design.md, "Recompute"):

* the protocol sets ``shift`` to the (global) maximum and ``coef = weight / sum`` so that
  ``coef * exp(S - shift)`` is the weighted softmax normalised as a plain softmax is; a
  log-sum-exp shift would bias every probability by the rounding of the log-sum-exp
  itself (``eps * |lse|``, large at scale 100);
* at the positive, ``G`` is ``pos_grad``, which the protocol forms from the forward's
  sums (``1 - p = neg / sum``), never from a recomputed product: at a peaked softmax
  ``p - w`` cancels, a recomputed logit one ulp away (another product routine,
  orientation or summation order) would leave ``w * eps * scale`` of error, and even the
  forward's own logit leaves ``w * eps`` where the truth is ~0. Where a kernel still
  needs ``S`` at the positive (the temperature's terms with same-item positives), it is
  the forward's ``diag[i]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..targets import Targets


@dataclass
class ForwardStats:
    """Statistics of one rank's ``b x B`` block of logits (all fp32).

    row_max: [b] maximum of each local row over all ``B`` columns.
    row_neg: [b] ``sum_{j != offset + i} exp(S[i, j] - row_max[i])``, the negatives' sum.
    col_max: [B] maximum over the local rows only (``-inf`` when ``b == 0``).
    col_neg: [B] ``sum_{i: offset + i != j} exp(S[i, j] - col_max[j])`` over the local rows
             (0 when ``b == 0``).
    diag:    [b] the positive logits ``S[i, offset + i]``, from the tiles the sums came from.

    Keeping the positive out of the sums is what lets the loss keep fp32 relative
    accuracy when it is small (:func:`palmtree.protocol.nll_terms`).
    """

    row_max: torch.Tensor
    row_neg: torch.Tensor
    col_max: torch.Tensor
    col_neg: torch.Tensor
    diag: torch.Tensor
    #: With same-item positives (``Targets`` with ``ignore=False``): each local row's sum
    #: over its other targets of ``pair_dot[own] - <u_i, v_j>`` (its own pair's similarity
    #: less the target's) [b], each column's over the local rows [B], and the largest
    #: logit at a target, per row [b] and per column over the local rows [B] (the
    #: accuracies). ``None`` otherwise.
    row_pos_gap: torch.Tensor | None = None
    col_pos_gap: torch.Tensor | None = None
    row_pos_max: torch.Tensor | None = None
    col_pos_max: torch.Tensor | None = None

    @property
    def row_sum(self) -> torch.Tensor:
        """``sum_j exp(S[i, j] - row_max[i])``, the positive included."""
        return self.row_neg + torch.exp(self.diag - self.row_max)

    @classmethod
    def empty(cls, B: int, device: torch.device, targets: Targets | None = None) -> ForwardStats:
        """The statistics of a rank with no rows: ``(-inf, 0)`` column partials (with
        same-item positives among ``targets``, the targets' too)."""
        f32 = dict(dtype=torch.float32, device=device)
        none = torch.empty(0, **f32)
        col_max = torch.full((B,), -torch.inf, **f32)
        stats = cls(none, none, col_max, torch.zeros(B, **f32), none)
        if targets is not None and not targets.ignore:
            stats.row_pos_gap, stats.row_pos_max = none, none
            stats.col_pos_gap, stats.col_pos_max = torch.zeros(B, **f32), col_max.clone()
        return stats


@dataclass
class GradientTerms:
    """What :meth:`Kernels.backward` needs to rebuild ``G`` (all fp32; see the module docstring).

    row_shift, row_coef: [b]; col_shift, col_coef: [B]; pos_grad: [b], ``G`` at each local
    row's positive (not formed from the tile: the protocol forms it without
    cancellation); diag: [b], the forward's positive logits; pair_dot: [B],
    ``<u_k, v_k>`` of every global pair from the rounded operands (``dscale``'s
    differences; computed by the rank holding pair ``k``).
    """

    row_shift: torch.Tensor
    row_coef: torch.Tensor
    col_shift: torch.Tensor
    col_coef: torch.Tensor
    pos_grad: torch.Tensor
    diag: torch.Tensor
    pair_dot: torch.Tensor
    #: With same-item positives: ``targets``, what the ``dscale`` differences are taken
    #: against (``row_ref`` [b] and ``col_ref`` [one per column]: the mean of ``U V^T``
    #: over each row's and each column's targets, in place of ``d`` and ``c``), and the
    #: weights subtracted at a target off the diagonal, ``row_target[i] + col_target[j]``.
    #: With ignored same-item pairs: ``targets`` only (``G`` is 0 there).
    targets: Targets | None = None
    row_ref: torch.Tensor | None = None
    col_ref: torch.Tensor | None = None
    row_target: torch.Tensor | None = None
    col_target: torch.Tensor | None = None

    def to_f32(self) -> GradientTerms:
        """Detached, contiguous fp32 copies (views the protocol hands in may be strided)."""
        fields = (self.row_shift, self.row_coef, self.col_shift, self.col_coef)
        rest = (self.pos_grad, self.diag, self.pair_dot)
        copies = [t.detach().to(torch.float32).contiguous() for t in fields + rest]
        extra = [
            None if t is None else t.detach().to(torch.float32).contiguous()
            for t in (self.row_ref, self.col_ref, self.row_target, self.col_target)
        ]
        return GradientTerms(*copies, self.targets, *extra)


def zero_grads(u: torch.Tensor, v: torch.Tensor):
    """``(dU, dV_partial, dscale)`` of a rank with no rows (or as accumulators): zeros."""
    f32 = dict(dtype=torch.float32, device=u.device)
    return torch.zeros(u.shape, **f32), torch.zeros(v.shape, **f32), torch.zeros((), **f32)


class Kernels(Protocol):
    """What a single-pass backend implements. See the module docstring for the math."""

    name: str

    def forward(
        self,
        u: torch.Tensor,
        v: torch.Tensor,
        scale: torch.Tensor,
        offset: int,
        precision: str,
        chunk_size: int | None,
        targets: Targets | None = None,
        pairs: int | None = None,
    ) -> ForwardStats: ...

    def backward(
        self,
        u: torch.Tensor,
        v: torch.Tensor,
        scale: torch.Tensor,
        offset: int,
        precision: str,
        chunk_size: int | None,
        terms: GradientTerms,
        pairs: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(dU [b, D], dV_partial [B, D], dscale [])``, all fp32. ``pairs``: a
        hint that the columns from ``pairs`` on are extra negatives, whose column part is
        0 (a backend may skip it, and their column statistics in ``forward``)."""
        ...


@dataclass
class SigmoidStats:
    """Forward statistics of one rank's ``b x B`` block for the sigmoid loss (fp32).

    With ``x = S + bias``: pos_sum ``sum_i softplus(-x[i, offset + i])``, neg_sum the sum
    of ``softplus(x)`` over every other entry (0-dim tensors); row_max [b], col_max [B]
    (over the local rows, ``-inf`` when ``b == 0``) and diag [b] of ``S``, for the
    accuracies.
    """

    pos_sum: torch.Tensor
    neg_sum: torch.Tensor
    row_max: torch.Tensor
    col_max: torch.Tensor
    diag: torch.Tensor
    #: With same-item positives: the largest ``S`` at a positive, per row and per column
    #: over the local rows (the accuracies); ``None`` otherwise.
    row_pos_max: torch.Tensor | None = None
    col_pos_max: torch.Tensor | None = None

    @classmethod
    def empty(cls, B: int, device: torch.device, targets: Targets | None = None) -> SigmoidStats:
        """The statistics of a rank with no rows (with labels, the positives' maxima too)."""
        f32 = dict(dtype=torch.float32, device=device)
        none = torch.empty(0, **f32)
        zero = torch.zeros((), **f32)
        col_max = torch.full((B,), -torch.inf, **f32)
        stats = cls(zero, zero.clone(), none, col_max, none)
        if targets is not None:
            stats.row_pos_max, stats.col_pos_max = none, col_max.clone()
        return stats


class SigmoidKernels(Protocol):
    """A single-pass backend of the sigmoid loss.

    ``backward`` builds ``G[i, j] = row_weight[i] * (-z_ij) * sigmoid(-z_ij * x_ij)`` (``z``
    +1 at the positives ``j == offset + i``, -1 elsewhere; ``x = S + bias``) and returns
    ``dU = scale * G @ V``, ``dV = scale * G^T @ U`` (this rank's partial),
    ``dscale = sum G * (U V^T)`` and ``dbias = sum G``. The loss is elementwise: no
    statistics, so nothing a recompute could unbalance.
    """

    name: str

    def sigmoid_forward(
        self, u, v, scale, bias, offset: int, precision: str, chunk_size: int | None, targets=None
    ) -> SigmoidStats: ...

    def sigmoid_backward(
        self, u, v, scale, bias, offset: int, precision: str, chunk_size, row_weight, targets=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...
