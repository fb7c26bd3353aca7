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

from .tracing import VALUE_CHECKS, GraphChecks, compiling, require
from .watchdog import exchange_watch

# torch 2.13 renamed the fixed-size collectives; older releases only have the old names.
all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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
    """How the global batch is split: ``sizes[r]`` pairs on rank ``r``, in rank order, and
    ``negative_sizes[r]`` extra text columns (``text_negatives``; none when empty)."""

    rank: int
    world_size: int
    sizes: tuple[int, ...]
    group: object = None
    negative_sizes: tuple[int, ...] = ()

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

    def with_own_size(self, rows) -> Layout:
        """This layout with this rank's size given as ``rows`` (equal to it). A backward
        traced by ``torch.compile`` passes a saved tensor's row count: the compiler relates
        the forward's sizes to the backward's only through the saved tensors."""
        sizes = list(self.sizes)
        sizes[self.rank] = rows
        return Layout(self.rank, self.world_size, tuple(sizes), self.group, self.negative_sizes)

    @property
    def negatives(self) -> Layout:
        """The layout of the extra text columns, for their gathers and reduce-scatters."""
        sizes = self.negative_sizes or (0,) * self.world_size
        return Layout(self.rank, self.world_size, tuple(sizes), self.group)

    def per_column(self, values: torch.Tensor) -> torch.Tensor:
        """``[B]``: for each global column, the value of the rank owning it, from the
        per-rank ``values`` (``[world_size]``)."""
        if self.world_size == 1:
            return values.expand(self.b_global)
        counts = torch.tensor(self.sizes, device=values.device)
        return torch.repeat_interleave(values, counts, output_size=self.b_global)


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
    graph_checks: GraphChecks | None = None,
    n_negatives: int = 0,
) -> Layout:
    """Agrees on the batch layout and validates inputs on every rank at once.

    One small all-gather carries each rank's batch size, extra text columns
    (``n_negatives``), whether it found a problem in its own inputs, and the codes of
    everything the ranks must agree on (``agreed``). Every rank then raises the same
    :class:`ClipLossInputError`, naming the rank(s) at fault, instead of one rank raising
    and the rest hanging in the next collective; an empty global batch is one too. Under
    ``torch.compile`` see :func:`_exchange_traced` (``graph_checks``: the value checks).
    """
    rank, world_size = world(group)
    if world_size == 1:
        if local_error is not None:
            raise ClipLossInputError(local_error)
        if b_local == 0:
            raise ClipLossInputError(_EMPTY)
        if graph_checks is not None:
            graph_checks.require_here()
        return Layout(0, 1, (b_local,), group, (n_negatives,))
    if compiling():
        checks = graph_checks or GraphChecks()
        sizes = (b_local, n_negatives)
        return _exchange_traced(rank, world_size, sizes, agreed, local_error, group, checks)

    width = _HEAD + len(agreed)
    head = [b_local, int(local_error is not None), n_negatives]
    meta = torch.tensor([*head, *(a.code for a in agreed)], dtype=torch.int64)
    device = _exchange_device(group, device)
    gathered = torch.empty(world_size * width, dtype=torch.int64, device=device)
    with exchange_watch(rank, world_size):  # where a rank calling the loss alone waits
        all_gather_into(gathered, meta.to(device), group=group)
        rows = gathered.view(world_size, width).tolist()

    if any(row[1] for row in rows):
        # Rare path: fetch the actual messages so every rank can report them.
        messages: list[str | None] = [None] * world_size
        dist.all_gather_object(messages, local_error, group=group)
        text = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
        raise ClipLossInputError(text)

    mismatches = []
    for k, field in enumerate(agreed, start=_HEAD):
        codes = [row[k] for row in rows]
        if len(set(codes)) > 1:
            listing = ", ".join(f"rank {r}: {field.show(c)}" for r, c in enumerate(codes))
            mismatches.append(f"{field.name} differs across ranks ({listing})")
    if mismatches:
        raise ClipLossInputError("; ".join(mismatches))
    if all(row[0] == 0 for row in rows):
        raise ClipLossInputError(_EMPTY)
    negatives = tuple(row[2] for row in rows)
    return Layout(rank, world_size, tuple(row[0] for row in rows), group, negatives)


#: The exchange's leading entries: the batch size, the error flag, the extra columns.
_HEAD = 3


def functional_group(group):
    """``group`` as the functional collectives take it (they have no default group)."""
    return dist.group.WORLD if group is None else group


_EMPTY = "the global batch is empty: every rank passed 0 pairs"
_EMPTY_RANK_COMPILED = (
    "a rank passed 0 pairs to a compiled loss: under torch.compile with several ranks "
    "every rank needs at least one pair (an eager call accepts empty ranks)"
)


def _exchange_traced(rank, world_size, own, agreed, local_error, group, checks) -> Layout:
    """:func:`exchange_layout` in a graph ``torch.compile`` traces: the same all-gather (a
    functional collective) with the value checks' flags and the scale's and bias's bits
    appended, its verdicts as assertions (:func:`palmtree.tracing.require`: a
    ``RuntimeError`` with the same words on every rank, in the same order), and the
    ranks' sizes as values the graph reads at run time, so that a new split compiles
    nothing new."""
    from torch.distributed import _functional_collectives as fc

    (b_local, n_negatives), device = own, _exchange_device(group, torch.device("cpu"))
    codes = (a.code for a in agreed)
    head = torch.tensor([b_local, int(local_error is not None), n_negatives, *codes])
    meta = torch.cat([head.to(device), checks.packed(device)])
    rows = fc.all_gather_tensor(meta, 0, functional_group(group)).view(world_size, -1)
    for r in range(world_size):
        why = f": {local_error}" if r == rank and local_error else " (its own error says which)"
        require(rows[r, 1] == 0, f"rank {r}: a problem in its input{why}")
    names = [a.name for a in agreed]
    for k, name in enumerate(names, start=_HEAD):
        require((rows[:, k] == rows[0, k]).all(), f"{name} differs across ranks")
    first = _HEAD + len(names)
    for r in range(world_size):
        for k, message in enumerate(VALUE_CHECKS, start=first):
            require(rows[r, k] == 0, f"rank {r}: {message}")
    for k, name in enumerate(("logit_scale", "logit_bias"), start=first + len(VALUE_CHECKS)):
        require((rows[:, k] == rows[0, k]).all(), f"{name} differs across ranks")
    require(rows[:, 0].sum() > 0, _EMPTY)
    # A graph traced for 0 rows leaves out the backward's collectives that only feed the
    # rows' gradients (docs/design.md §9): every rank is refused, none waits for it.
    require((rows[:, 0] > 0).all(), _EMPTY_RANK_COMPILED)
    sizes, negatives = rows[:, 0].tolist(), rows[:, 2].tolist()
    for s in sizes + negatives:
        torch._check(s >= 0)
    torch._check(sizes[rank] == b_local)  # this rank's own size, as its input's shape says
    torch._check(negatives[rank] == n_negatives)
    return Layout(rank, world_size, tuple(sizes), group, tuple(negatives))
