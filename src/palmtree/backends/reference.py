"""The readable backend: materialised logits and autograd through differentiable gathers.

Both the images and the texts are gathered with a gather whose backward sums every
rank's gradient (:func:`palmtree.distributed.gather_rows_with_grad`); rank ``r``
computes its own rows and its own columns of the global logits (two ``b x B``
blocks) and plain cross-entropies. Autograd does the rest, which makes this the
oracle the single-pass backends are tested against. Memory is O(b * B).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distributed import Layout, all_reduce_, gather_rows_with_grad
from ..precision import round_to_tf32


def _round_operand(x: torch.Tensor, precision: str) -> torch.Tensor:
    """Rounds operands like the single-pass kernels do; the gradient passes straight through."""
    if precision == "bf16":
        return x.to(torch.bfloat16).float()
    if precision == "tf32":
        return x + (round_to_tf32(x.detach()) - x).detach()
    return x


def reference_loss(
    u: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, layout: Layout, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :class:`palmtree.protocol.SinglePassLoss`: ``(N * share_r, sums)``."""
    o, b, big = layout.offset, layout.b_local, layout.b_global
    u_all = gather_rows_with_grad(u, layout)
    v_all = gather_rows_with_grad(v, layout)
    uq, vq = _round_operand(u, precision), _round_operand(v, precision)
    image_rows = scale * uq @ _round_operand(v_all, precision).T  # S[o:o+b, :]
    text_rows = scale * vq @ _round_operand(u_all, precision).T  # S[:, o:o+b]^T
    labels = torch.arange(o, o + b, device=u.device)
    row_sum = F.cross_entropy(image_rows, labels, reduction="sum")
    col_sum = F.cross_entropy(text_rows, labels, reduction="sum")
    share = (row_sum + col_sum) / (2 * big)

    with torch.no_grad():
        sums = torch.zeros(4, dtype=torch.float32, device=u.device)
        sums[0], sums[1] = row_sum.detach(), col_sum.detach()
        if b:
            for k, rows in ((2, image_rows), (3, text_rows)):
                positives = rows.gather(1, labels[:, None]).squeeze(1)
                sums[k] = (positives >= rows.amax(1)).sum()
        all_reduce_(sums, layout)
    return layout.world_size * share, sums
