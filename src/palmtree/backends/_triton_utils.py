"""Triton helpers shared by the fused kernels: operand rounding and the one product.

Operands reach the kernels already rounded on the host (bf16 tensors, or fp32 tensors
rounded to TF32), so products of them are exact and only the accumulation order
differs from :mod:`palmtree.backends.chunked`. The one operand made inside a kernel,
the gradient tile ``G``, is rounded here the same way :func:`palmtree.precision.
cast_operand` rounds it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_operand(x, PRECISION: tl.constexpr):
    """An fp32 tile as the product consumes it: bf16 (RNE), TF32 (as the host rounds) or as is."""
    if PRECISION == "bf16":
        x = x.to(tl.bfloat16)
    elif PRECISION == "tf32":
        # Round half away from zero on the 13 dropped mantissa bits, like round_to_tf32.
        bits = x.to(tl.int32, bitcast=True)
        x = ((bits + 4096) & -8192).to(tl.float32, bitcast=True)
    return x


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation, for operands passed through the rounding."""
    if PRECISION == "bf16":
        if INTERPRET:
            # The interpreter multiplies bf16 tiles as their raw 16-bit patterns; products
            # of bf16 values are exact in fp32, so widen them first.
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    elif PRECISION == "tf32":
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc
