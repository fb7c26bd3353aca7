"""The collectives of the loss, for ranks that hold different numbers of pairs.

Everything here is plain ``torch.distributed`` (gloo on CPU, NCCL on GPUs). Each
function works without an initialised process group (world size 1) and with an
explicit ``group``. Per-rank batch sizes may differ and may be zero: rows are padded
to the largest rank for the fixed-size collectives and unpadded afterwards.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .watchdog import exchange_watch

# torch 2.13 renamed the fixed-size collectives; older releases only have the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class ClipLossInputError(ValueError):
    """Bad input to the loss. Raised on every rank, naming the rank(s) at fault."""


class _Local:
    """The ``group`` of a loss computed on this process's tensors alone."""

    def __repr__(self) -> str:
        return "palmtree.distributed.LOCAL"


#: What the losses exchange with when called with ``distributed=False``: nothing. Every
#: function here treats it as a world of one rank, whether or not a process group is up.
LOCAL = _Local()


def free_port() -> int:
    """A free TCP port on loopback, for the rendezvous of locally spawned ranks."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_world() -> bool:
    """Whether a launcher (torchrun) gave this process its rank and world size."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_distributed(group=None) -> bool:
    return world(group)[1] > 1


def world(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` within ``group``; ``(0, 1)`` without a process group or for
    :data:`LOCAL`."""
    if group is LOCAL or not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


@dataclass(frozen=True)
class Layout:
    """How the global batch is split: ``sizes[r]`` pairs on rank ``r``, in rank order."""

    rank: int
    world_size: int
    sizes: tuple[int, ...]
    group: object = None

    @property
    def b_local(self) -> int:
        return self.sizes[self.rank]

    @property
    def b_global(self) -> int:
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def b_max(self) -> int:
        return max(self.sizes)

    def owner_of_columns(self, device) -> torch.Tensor:
        """``[B]`` rank index owning each global column."""
        return torch.repeat_interleave(
            torch.arange(self.world_size, device=device),
            torch.tensor(self.sizes, device=device),
        )


@dataclass(frozen=True)
class Agreed:
    """A value every rank must pass identically: an int64 code and how to show one.

    ``choice`` covers names from a fixed tuple (backends, dtypes, modes); ``number`` a
    float, compared bit for bit (ranks hold the same parameters, so the same bits).
    """

    name: str
    code: int
    show: Callable[[int], str]

    @classmethod
    def choice(cls, name: str, value, choices: tuple) -> Agreed:
        code = choices.index(value) if value in choices else -1
        return cls(name, code, lambda c: str(choices[c]) if 0 <= c < len(choices) else "?")

    @classmethod
    def number(cls, name: str, value: float) -> Agreed:
        return cls(name, _float_bits(value), lambda c: repr(_bits_float(c)))


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bits_float(c: int) -> float:
    return struct.unpack("<d", struct.pack("<q", c))[0]


def _exchange_device(group, preferred: torch.device) -> torch.device:
    """Where the small exchange tensor lives: NCCL needs CUDA, gloo takes CPU."""
    if "nccl" in str(dist.get_backend(group)).lower():
        if preferred.type == "cuda":
            return preferred
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_membership(group) -> None:
    """Raises on a process that calls the loss with a ``group`` it is not a member of."""
    if group is None or group is LOCAL or not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_rank(group) < 0:
        raise ClipLossInputError(
            f"this process (global rank {dist.get_rank()}) is not a member of the group it "
            "passed; only the group's ranks may compute its loss"
        )


def exchange_layout(
    b_local: int,
    agreed: list[Agreed],
    device: torch.device,
    local_error: str | None,
    group=None,
) -> Layout:
    """Agrees on the batch layout and validates inputs on every rank at once.

    One small all-gather carries each rank's batch size, whether it found a problem in
    its own inputs, and the codes of everything the ranks must agree on (``agreed``).
    Every rank then raises the same :class:`ClipLossInputError`, naming the rank(s) at
    fault, instead of one rank raising and the rest hanging in the next collective.
    """
    rank, world_size = world(group)
    if world_size == 1:
        if local_error is not None:
            raise ClipLossInputError(local_error)
        return Layout(0, 1, (b_local,), group)

    width = 2 + len(agreed)
    meta = torch.tensor(
        [b_local, int(local_error is not None), *(a.code for a in agreed)], dtype=torch.int64
    )
    device = _exchange_device(group, device)
    gathered = torch.empty(world_size * width, dtype=torch.int64, device=device)
    with exchange_watch(rank, world_size):  # where a rank calling the loss alone waits
        _all_gather(gathered, meta.to(device), group=group)
        rows = gathered.view(world_size, width).tolist()

    if any(row[1] for row in rows):
        # Rare path: fetch the actual messages so every rank can report them.
        messages: list[str | None] = [None] * world_size
        dist.all_gather_object(messages, local_error, group=group)
        text = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
        raise ClipLossInputError(text)

    mismatches = []
    for k, field in enumerate(agreed, start=2):
        codes = [row[k] for row in rows]
        if len(set(codes)) > 1:
            listing = ", ".join(f"rank {r}: {field.show(c)}" for r, c in enumerate(codes))
            mismatches.append(f"{field.name} differs across ranks ({listing})")
    if mismatches:
        raise ClipLossInputError("; ".join(mismatches))
    return Layout(rank, world_size, tuple(row[0] for row in rows), group)


def gather_rows(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """All ranks' rows of ``x`` concatenated in rank order (``[B, ...]``), no autograd."""
    if layout.world_size == 1:
        return x
    padded = x.new_zeros((layout.b_max, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = x.new_empty((layout.world_size * layout.b_max, *x.shape[1:]))
    _all_gather(out, padded.contiguous(), group=layout.group)
    if all(s == layout.b_max for s in layout.sizes):
        return out
    return torch.cat(
        [out[r * layout.b_max : r * layout.b_max + s] for r, s in enumerate(layout.sizes)]
    )


def reduce_scatter_rows(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Sums ``[B, ...]`` partials over ranks and returns this rank's ``[b_local, ...]`` rows."""
    if layout.world_size == 1:
        return x
    if all(s == layout.b_max for s in layout.sizes):
        padded = x.contiguous()
    else:
        padded = x.new_zeros((layout.world_size * layout.b_max, *x.shape[1:]))
        start = 0
        for r, s in enumerate(layout.sizes):
            padded[r * layout.b_max : r * layout.b_max + s] = x[start : start + s]
            start += s
    out = x.new_empty((layout.b_max, *x.shape[1:]))
    _reduce_scatter(out, padded, op=dist.ReduceOp.SUM, group=layout.group)
    return out[: layout.b_local]


def all_reduce_(x: torch.Tensor, layout: Layout, op=None) -> torch.Tensor:
    if layout.world_size > 1:
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=layout.group)
    return x


def all_gather_scalar(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``[world_size]`` tensor of every rank's value of the 0-dim tensor ``x``."""
    x = x.reshape(1)
    if layout.world_size == 1:
        return x
    out = x.new_empty(layout.world_size)
    _all_gather(out, x.contiguous(), group=layout.group)
    return out


class _GatherRows(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient and sends each rank its rows.

    This is the gather that keeps a distributed loss exact: rank ``r``'s features
    receive the gradient that *all* ranks' losses send them.
    """

    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        return gather_rows(x, layout)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_rows(grad.contiguous(), ctx.layout), None


def gather_rows_with_grad(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    if layout.world_size == 1:
        return x
    return _GatherRows.apply(x, layout)
