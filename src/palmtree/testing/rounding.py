"""The units of the error analysis: fp32's rounding, ``gamma(n)``, each logit's error bound.

What the truths' bounds are built from (the package docstring says how).
"""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = 2.0**-24  # fp32
#: Absolute error of an fp32 result that underflows (the spacing of the subnormals):
#: each elementary operation may add this on top of its relative error.
UNDERFLOW = 2.0**-149

#: Relative rounding of one matmul operand in each precision mode (tf32 keeps 10 mantissa
#: bits, bf16 7; ieee operands are exact).
OPERAND_UNIT = {"ieee": 0.0, "tf32": 2.0**-11, "bf16": 2.0**-8}


def gamma(n: float, u: float = UNIT_ROUNDOFF) -> float:
    """``n u / (1 - n u)``: the relative error bound of ``n`` rounded operations."""
    return n * u / (1 - n * u)


class LogitErrors:
    """``E_ij``, the bound on an fp32 logit's error, for a block of rows (package docstring).

    With rounded operands (``unit`` > 0) each product ``u_k v_k`` is also off by
    ``2.01 unit`` relative (two roundings and their product). ``v`` holds the columns the
    rows are compared with, as in :meth:`palmtree.testing.problem.Problem.dots`.
    """

    def __init__(self, u: torch.Tensor, v: torch.Tensor, s: float, dim: int, unit: float):
        self.abs_u, self.abs_v = u.abs(), v.abs()
        self.s, self.per_product = s, gamma(2 * dim + 4) + 2.01 * unit

    def dot_block(self, i0: int, i1: int) -> torch.Tensor:
        """The bound on the fp32 similarities ``U V^T`` of rows ``[i0, i1)``, unscaled."""
        return self.per_product * (self.abs_u[i0:i1] @ self.abs_v.T)

    def block(self, i0: int, i1: int) -> torch.Tensor:
        """``E`` of rows ``[i0, i1)``: the similarities' bound scaled, plus the scale's and
        the shift's rounding."""
        return self.s * (self.dot_block(i0, i1) + gamma(5))
