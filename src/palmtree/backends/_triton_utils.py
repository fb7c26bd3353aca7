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
        # Round to nearest even on the 16 dropped bits, in integers: the conversion's own
        # rounding mode differs between targets (Triton's CPU interpreter truncates), and
        # the host rounds the other operands (torch) to nearest even. The cast is then exact.
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
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


@triton.jit
def row_block(U, rows, row_ok, D, stride_u, BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr):
    """Pointers to a block of rows of ``U``, and the block itself when ``D`` fits in one
    ``BLOCK_K`` chunk (``SINGLE_K``): it is then loaded once for the program's whole sweep."""
    u_rows = U + rows.to(tl.int64)[:, None] * stride_u
    ks = tl.arange(0, BLOCK_K)
    if SINGLE_K:
        u = tl.load(u_rows + ks[None, :], mask=row_ok[:, None] & (ks < D)[None, :], other=0.0)
    else:
        u = tl.zeros((1, BLOCK_K), tl.float32)  # unused: the chunks are loaded per tile
    return u_rows, u


@triton.jit
def logits_tile(
    u,
    u_rows,
    V,
    cols,
    row_ok,
    col_ok,
    D,
    stride_v,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SINGLE_K: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """``U_block @ V[cols]^T`` with fp32 accumulation, over ``D`` in ``BLOCK_K`` chunks (one
    product with :func:`row_block`'s preloaded ``u`` when ``SINGLE_K``). Every forward
    makes its tiles here, so their rounding is the same for both losses."""
    ks = tl.arange(0, BLOCK_K)
    v_rows = V + cols.to(tl.int64)[:, None] * stride_v
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if SINGLE_K:
        v = tl.load(v_rows + ks[None, :], mask=col_ok[:, None] & (ks < D)[None, :], other=0.0)
        acc = mma(u, tl.trans(v), acc, PRECISION, INTERPRET)
    else:
        for k in range(0, D, BLOCK_K):
            kk = k + ks
            k_ok = kk < D
            a = tl.load(u_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            v = tl.load(v_rows + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc = mma(a, tl.trans(v), acc, PRECISION, INTERPRET)
    return acc
