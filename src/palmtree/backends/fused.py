"""``backend="fused"``: the single-pass contract of :mod:`.base` in Triton kernels.

Matmul passes are counted in ``P`` = one ``b x B x D`` product, ``2*b*B*D`` FLOPs.

forward, 1 P (:mod:`._triton_forward`; docs/kernels.md)
    Programs own (row block, column split). Each ``S`` tile is made once and gives the
    rows' online (max, sum of exp) *and* the columns' (max, sum of exp) over the tile's
    rows. Column partials go to a ``ceil(b/BLOCK_M) x width`` buffer of pairs, row
    partials to a ``splits x b`` buffer; a small kernel merges each along its leading
    axis. Every shift is a true maximum: exact for any logits (at ``s = 100`` with every
    similarity near -1 nothing underflows). No atomics.
    The partials cost 8 bytes per (row block, column); above ``partials_budget`` the
    columns run in segments, one launch each, reusing the buffer (256 MiB on CUDA: one
    launch up to ``b = B = 65536`` at ``BLOCK_M = 128``, less than Inf-CL's 1.5 GB).
backward, 4 P by default (:mod:`._triton_backward`)
    One kernel, launched twice: programs owning row blocks recompute their ``S`` tiles
    (1 P), build ``G`` with the positives folded in and accumulate ``dU`` in registers
    (1 P); then programs owning column blocks do the same on ``S^T`` for ``dV`` (2 P).
    ``S`` and ``G`` are never written out, and there are no atomics: programs that
    split the streamed side write separate partials the host sums.
    ``bwd_mode="atomic"`` instead lets the row programs add ``G^T U`` into ``dV`` with
    fp32 atomics: 3 P, but ``b/BLOCK_M * B * D`` atomic adds and a ``dV`` whose
    summation order depends on scheduling (reproducible to rounding, not bitwise).

5 passes in all by default (the floor without storing ``S`` is 4): the extra recompute
buys determinism and no atomic traffic, which at ``D = 512`` would be a 4-byte atomic
per 6*BLOCK_M FLOPs. Which is faster is for a GPU to decide: ``bwd_mode`` is one field.

Extra memory: the partials above, the rounded operand copies for ``tf32``/``bf16``
(``(b + B) x D``), ``dU``, ``dV`` and, when the streamed side is split, one ``dU``
partial per split (the splits only fill the grid when there are few row blocks).

Precision (:mod:`palmtree.precision`): operands are rounded on the host (bf16 tensors,
or fp32 rounded to TF32 as ``round_to_tf32`` does), so their products are exact and only
the fp32 accumulation order differs from ``chunked``; the ``G`` tile is rounded in the
kernel the same way. ``ieee`` uses Triton's exact fp32 product (FMA, no tensor cores).
Statistics and accumulators are fp32 in every mode; exp/log are Triton's fast fp32
versions on CUDA.

Same-item labels are compared per tile, in registers (``LABELS``/``IGNORE`` variants of
each kernel; docs/kernels.md): the ids of a tile's rows and columns are loaded beside its
operands, and no ``B x B`` mask exists. With same-item positives the forward's partials
hold two more fp32 values per (row block, column).

``chunk_size`` is ignored: tiles come from :class:`TilePlan`, column segments from the
partials budget. Triton is imported only when a kernel first runs. The CUDA block sizes
are the largest that compile for sm_90 without register spills up to ``D = 1024`` (the
compile audit, ``tests/test_compile_audit.py``, checks every launch in CI), not timed:
the ``BLOCK x next_pow2(D)`` fp32 gradient accumulator lives in registers, so backward
blocks shrink as ``D`` grows (16 rows at ``D > 512``).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..precision import precision_problem, rounded
from . import interpreting
from .base import ForwardStats, GradientTerms, SigmoidStats, zero_grads

BWD_MODES = ("two_kernels", "atomic")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """Block sizes and grid policy of one problem; see :meth:`for_problem`."""

    block_d: int  # next power of two >= max(D, 16): the dims a backward tile holds
    block_m: int  # forward rows per program
    block_n: int  # forward columns per tile
    block_k: int  # D chunk of every S product (>= D: the program's rows stay in registers)
    num_warps: int
    num_stages: int
    bwd_block_m: int  # rows (or columns) whose gradient a backward program accumulates
    bwd_block_n: int  # tile width on the side it streams
    bwd_block_k: int  # D chunk of the atomic dV products (bwd_mode="atomic")
    bwd_num_warps: int
    bwd_num_stages: int
    target_programs: int  # split columns until the grid has about this many programs
    partials_budget: int  # bytes of column partials per forward launch
    bwd_mode: str = "two_kernels"  # or "atomic": dV from the rows' programs, fp32 atomics

    @classmethod
    def for_problem(cls, dim: int, device: torch.device, precision: str) -> TilePlan:
        """Blocks that compile without register spills for sm_90 up to ``D = 1024`` (the
        compile audit checks it; speed itself is untuned)."""
        block_d = max(16, 1 << max(dim - 1, 0).bit_length())
        if interpreting() or device.type != "cuda":
            # The interpreter runs each program in numpy: few, whole-D programs are fastest.
            return cls(
                block_d=block_d,
                block_m=32,
                block_n=32,
                block_k=block_d,
                num_warps=4,
                num_stages=1,
                bwd_block_m=32,
                bwd_block_n=32,
                bwd_block_k=block_d,
                bwd_num_warps=4,
                bwd_num_stages=1,
                target_programs=1,
                partials_budget=64 << 20,
            )
        return cls.for_target(
            dim,
            precision,
            capability=torch.cuda.get_device_capability(device),
            sm_count=_sm_count(device.index),
        )

    @classmethod
    def for_target(
        cls,
        dim: int,
        precision: str,
        capability: tuple[int, int] = (9, 0),
        sm_count: int = 132,
    ) -> TilePlan:
        """The CUDA plan :meth:`for_problem` picks on a card of this compute ``capability``
        with ``sm_count`` multiprocessors (default: an H100/H200), computed without a GPU
        so that the kernels can be compiled for that card anywhere (the compile audit).
        The choice does not depend on ``capability`` yet: the audit checks it fits sm_80 too.
        """
        block_d = max(16, 1 << max(dim - 1, 0).bit_length())
        ieee = precision == "ieee"
        # Forward: ieee products are FMA loops, which need a thin K slice.
        block_k = 16 if ieee else min(block_d, 64 if precision == "bf16" else 32)
        if block_d <= 64 and not ieee:
            block_k = block_d
        # Backward: the BLOCK_M x D fp32 accumulator lives in registers; ieee's FMA loops
        # need more of them, so its blocks are smaller (the largest without spills on
        # sm_90 for both losses and both bwd_modes, per the compile audit).
        if ieee:
            own, other = (32, 64) if block_d <= 256 else (32, 32) if block_d == 512 else (16, 16)
        elif block_d <= 256:
            own, other = 64, 64
        elif block_d == 512:
            own, other = 32, 64
        else:
            own, other = 16, 32
        return cls(
            block_d=block_d,
            block_m=128,
            block_n=64,
            block_k=block_k,
            num_warps=8,
            num_stages=2 if ieee else 3,
            bwd_block_m=own,
            bwd_block_n=other,
            bwd_block_k=64,
            bwd_num_warps=8,
            bwd_num_stages=1,
            target_programs=4 * sm_count,
            partials_budget=256 << 20,
        )

    def segment_width(self, row_blocks: int, B: int, values: int = 2) -> int:
        """Columns per forward launch so that the partials (``values`` fp32 numbers per
        row block and column: (max, sum), and with same-item positives their targets'
        (gap, max) too) stay within budget."""
        cols = self.partials_budget // (4 * values * row_blocks)
        cols = max(self.block_n, cols // self.block_n * self.block_n)
        return max(1, min(cols, B))

    def splits(self, row_blocks: int, n_tiles: int) -> tuple[int, int]:
        """``(splits, tiles per split)``: no split is empty."""
        want = min(max(1, _cdiv(self.target_programs, row_blocks)), max(n_tiles, 1))
        per = _cdiv(n_tiles, want) if n_tiles else 1
        return max(1, _cdiv(n_tiles, per)), per


def _check(u, v, scale, offset, precision) -> None:
    problem = precision_problem(precision) if precision is not None else "precision is None"
    if problem is not None:
        raise ValueError(problem)
    if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[1]:
        raise ValueError(
            f"expected u [b, D] and v [B, D], got {tuple(u.shape)} and {tuple(v.shape)}"
        )
    if u.dtype != torch.float32 or v.dtype != torch.float32:
        raise TypeError(f"fused kernels take fp32 features, got {u.dtype} and {v.dtype}")
    if u.device != v.device or scale.device != u.device:
        raise ValueError(
            f"u, v and scale must share a device: {u.device}, {v.device}, {scale.device}"
        )
    if not 0 <= offset <= v.shape[0] - u.shape[0]:
        raise ValueError(
            f"offset {offset} puts rows [{offset}, {offset + u.shape[0]}) outside B={v.shape[0]}"
        )


@dataclasses.dataclass(frozen=True)
class Block:
    """What every launcher takes: one rank's rounded operands ``uq [b, D]`` and
    ``vq [B, D]``, the fp32 ``scale``, the rows' ``offset``, the ``precision`` and the plan."""

    uq: torch.Tensor
    vq: torch.Tensor
    scale: torch.Tensor
    offset: int
    precision: str
    plan: TilePlan


def _operand(x: torch.Tensor, precision: str) -> torch.Tensor:
    """Features rounded once on the host (:func:`palmtree.precision.rounded`), bf16 ones
    kept in bf16 for the kernels' bf16 products."""
    x = x.contiguous()
    return x.to(torch.bfloat16) if precision == "bf16" else rounded(x, precision)


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float32).contiguous()


class FusedKernels:
    """Triton kernels for :class:`palmtree.backends.base.Kernels`.

    ``overrides`` replace fields of the :class:`TilePlan` chosen per call (tests use them
    to force several K chunks, column splits and column segments on small problems).
    """

    name = "fused"

    def __init__(self, **overrides):
        self.overrides = overrides

    def plan(self, dim: int, device: torch.device, precision: str) -> TilePlan:
        plan = dataclasses.replace(TilePlan.for_problem(dim, device, precision), **self.overrides)
        if plan.bwd_mode not in BWD_MODES:
            raise ValueError(f"bwd_mode must be one of {BWD_MODES}, got {plan.bwd_mode!r}")
        return plan

    def block(self, u, v, scale, offset, precision) -> Block:
        """One rank's checked operands (rounded once on the host) and this call's plan."""
        _check(u, v, scale, offset, precision)
        plan = self.plan(u.shape[1], u.device, precision)
        return Block(
            _operand(u, precision), _operand(v, precision), _f32(scale), offset, precision, plan
        )

    def forward(
        self, u, v, scale, offset, precision, chunk_size, targets=None, pairs=None
    ) -> ForwardStats:
        block = self.block(u, v, scale, offset, precision)
        if u.shape[0] == 0:
            return ForwardStats.empty(v.shape[0], u.device, targets)
        from ._triton_forward import forward_stats

        return forward_stats(block, targets)

    def backward(
        self, u, v, scale, offset, precision, chunk_size, terms: GradientTerms, pairs=None
    ):
        block = self.block(u, v, scale, offset, precision)
        if u.shape[0] == 0:
            return zero_grads(u, v)
        from ._triton_backward import backward_grads

        return backward_grads(block, terms.to_f32())

    def sigmoid_forward(
        self, u, v, scale, bias, offset, precision, chunk_size, targets=None
    ) -> SigmoidStats:
        block = self.block(u, v, scale, offset, precision)
        if u.shape[0] == 0:
            return SigmoidStats.empty(v.shape[0], u.device, targets)
        from ._triton_sigmoid import sigmoid_forward_stats

        return sigmoid_forward_stats(block, _f32(bias), targets)

    def sigmoid_backward(
        self, u, v, scale, bias, offset, precision, chunk_size, row_weight, targets=None
    ):
        block = self.block(u, v, scale, offset, precision)
        if u.shape[0] == 0:
            du, dv, dscale = zero_grads(u, v)
            return du, dv, dscale, dscale.clone()
        from ._triton_backward import sigmoid_backward_grads

        return sigmoid_backward_grads(block, _f32(bias), _f32(row_weight), targets)
