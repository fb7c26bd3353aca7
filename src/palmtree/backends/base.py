"""The contract between the distributed protocol and a kernel backend.

A kernel backend sees one rank's slice of the global logits and nothing else:

    S = scale * U @ V^T        U: [b, D] this rank's unit image rows (fp32)
                               V: [B, D] every rank's unit text rows (fp32)

Row ``i`` of ``U`` is global pair ``offset + i``, so its positive is column
``offset + i``. Kernels never talk to other ranks; :mod:`palmtree.protocol` does
the gathers, the log-sum-exp all-reduce and the reduce-scatter around them.

``forward`` returns the statistics of the local rows. ``backward`` is given the
completed (global) column log-sum-exps and per-row / per-column weights and
returns the gradients of

    J = sum_i w_row[i] * (row_lse[i] - S[i, offset+i])
      + sum_j w_col[j] * (col_lse[j] - S[j-offset, j])   (second sum: local j only)

restricted to the local rows, i.e. with

    G[i, j] = w_row[i] * exp(S[i, j] - row_lse[i]) + w_col[j] * exp(S[i, j] - col_lse[j])
              - [j == offset + i] * (w_row[i] + w_col[j])

    dU = scale * G @ V,   dV = scale * G^T @ U,   dscale = sum_ij G[i, j] * S[i, j] / scale.

``w_col`` is given for all ``B`` columns; the positive term uses it only on the
local diagonal. ``dV`` is this rank's partial for every column: the protocol sums
the partials across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

PRECISIONS = ("ieee", "tf32", "bf16")


@dataclass
class ForwardStats:
    """Statistics of one rank's ``b x B`` block of logits (all fp32).

    row_lse: [b] log-sum-exp over all ``B`` columns of each local row.
    row_max: [b] maximum of each local row.
    col_lse: [B] log-sum-exp over the local rows only (``-inf`` when ``b == 0``).
    col_max: [B] maximum over the local rows only (``-inf`` when ``b == 0``).
    diag:    [b] the positive logits ``S[i, offset + i]``, computed as the tiles are.
    """

    row_lse: torch.Tensor
    row_max: torch.Tensor
    col_lse: torch.Tensor
    col_max: torch.Tensor
    diag: torch.Tensor


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
    ) -> ForwardStats: ...

    def backward(
        self,
        u: torch.Tensor,
        v: torch.Tensor,
        scale: torch.Tensor,
        offset: int,
        precision: str,
        chunk_size: int | None,
        row_lse: torch.Tensor,
        col_lse: torch.Tensor,
        w_row: torch.Tensor,
        w_col: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(dU [b, D], dV_partial [B, D], dscale [])``, all fp32."""
        ...
