"""Operand precision of the similarity matmuls.

Statistics, softmax weights and every accumulator are fp32 whatever the mode; the
mode only decides how the *operands* of the ``U @ V^T`` products are rounded:

* ``"ieee"``: exact fp32 products.
* ``"tf32"``: operands rounded to TF32 (10-bit mantissa), fp32 accumulation.
* ``"bf16"``: operands rounded to bfloat16, fp32 accumulation and fp32 output
  (the logits are never rounded to bf16; that alone costs ~1e-3 relative error
  in the loss).

The default follows PyTorch's own switch for fp32 matmuls,
``torch.get_float32_matmul_precision()``: ``highest -> ieee``, ``high -> tf32``,
``medium -> bf16``. Features are normalised in fp32 before any product, so the
rule is the same for fp32, bf16 and fp16 inputs.

On CPUs (no TF32 units, no fp32-output bf16 GEMM) the rounded operands are
multiplied exactly in fp32: products of bf16/TF32 values are exact in fp32, so
the result is what a GPU's fp32-accumulating kernel computes, up to summation
order.
"""

from __future__ import annotations

import contextlib

import torch

#: The operand precision modes, everywhere (the loss's option, verify's and bench's flags).
PRECISIONS = ("ieee", "tf32", "bf16")

_FROM_TORCH = {"highest": "ieee", "high": "tf32", "medium": "bf16"}


def precision_problem(precision) -> str | None:
    """Why ``precision`` is no precision option (``None`` is one: PyTorch's own setting)."""
    if precision is None or precision in PRECISIONS:
        return None
    return f"precision must be one of {PRECISIONS} or None, got {precision!r}"


def resolve_precision(precision: str | None) -> str:
    """Turns ``None`` into the mode PyTorch's fp32 matmul setting asks for."""
    problem = precision_problem(precision)
    if problem is not None:
        raise ValueError(problem)
    if precision is None:
        return _FROM_TORCH.get(_torch_fp32_precision(), "ieee")
    return precision


def _torch_fp32_precision() -> str:
    """``torch.get_float32_matmul_precision()``; ``torch.compile`` takes it as a constant
    of the traced graph (a string is no tensor it could trace)."""
    return torch.get_float32_matmul_precision()


# What ``torch.compiler.assume_constant_result`` does, without its import of the compiler
# (which would load torch._dynamo and Triton at ``import palmtree``); tests/test_compile.py
# compiles a call with ``precision=None`` to see that it still holds.
_torch_fp32_precision._dynamo_marked_constant = True


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """Rounds fp32 values to the nearest TF32 value (10 explicit mantissa bits)."""
    bits = x.contiguous().view(torch.int32)
    # Round to nearest (ties away from zero) on the 13 dropped mantissa bits.
    bits = (bits + (1 << 12)) & ~((1 << 13) - 1)
    return bits.view(torch.float32)


def rounded(x: torch.Tensor, precision: str) -> torch.Tensor:
    """fp32 ``x`` with each value rounded as ``precision`` rounds a product's operands:
    the one definition of the modes' rounding (the backends, the fp32 reference and
    ``palmtree.testing`` add only where and in which representation it happens)."""
    if precision == "bf16":
        return x.to(torch.bfloat16).float()
    if precision == "tf32":
        return round_to_tf32(x)
    return x


def cast_operand(x: torch.Tensor, precision: str) -> torch.Tensor:
    """The operand as the matmul will consume it: on CUDA bf16 itself (fp32-output GEMM)
    and fp32 for TF32 (the hardware rounds), elsewhere :func:`rounded` fp32 values."""
    if x.is_cuda and precision == "tf32":
        return x
    if x.is_cuda and precision == "bf16" and _has_fp32_out_mm():
        return x.to(torch.bfloat16)
    return rounded(x, precision)


@contextlib.contextmanager
def fp32_matmul_mode(precision: str, device: torch.device):
    """Within the block, fp32 CUDA matmuls use TF32 exactly when ``precision == "tf32"``."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


_FP32_OUT_MM: bool | None = None


def _has_fp32_out_mm() -> bool:
    """Whether ``torch.mm(bf16, bf16, out_dtype=float32)`` exists (CUDA, torch >= 2.8)."""
    global _FP32_OUT_MM
    if _FP32_OUT_MM is None:
        try:
            a = torch.zeros(1, 1, dtype=torch.bfloat16, device="cuda")
            torch.mm(a, a, out_dtype=torch.float32)
            _FP32_OUT_MM = True
        except (TypeError, RuntimeError, NotImplementedError):
            _FP32_OUT_MM = False
    return _FP32_OUT_MM


def mm(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """``a @ b`` in fp32 for operands already passed through :func:`cast_operand`."""
    if a.dtype == torch.bfloat16:
        return torch.mm(a, b, out_dtype=torch.float32)
    with fp32_matmul_mode(precision, a.device):
        return torch.mm(a, b)
