"""How the ranks of one ``accumulate`` call agree: on a failure anywhere, and at entry.

A failure on one rank must reach every rank as the same error before anyone enters a
collective the failing rank will never join (the gradient all-reduce, DDP's broadcast of
buffers in the first forward). Everything here is plain ``torch.distributed`` on the
loss's group.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import ClipLossInputError, world


@dataclass
class Failure:
    """What went wrong on this rank: the message every rank will show, and the exception
    that caused it (chained on this rank only)."""

    message: str
    cause: BaseException | None = None


class Ranks:
    """The ranks of ``group`` (one rank without a process group)."""

    def __init__(self, group):
        self.group = group
        self.rank, self.size = world(group)

    def device(self) -> torch.device:
        """Where a flag tensor lives: NCCL only reduces CUDA tensors, gloo takes CPU ones."""
        if "nccl" in str(dist.get_backend(self.group)).lower():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def any_failed(self, failure: Failure | None) -> bool:
        """Whether any rank failed: one all-reduce of one integer (a collective)."""
        if self.size == 1:
            return failure is not None
        flag = torch.tensor([int(failure is not None)], dtype=torch.int32, device=self.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def raise_failures(self, failure: Failure | None) -> NoReturn:
        """Raises one :class:`ClipLossInputError` naming every failed rank, the same on every
        rank (a collective: every rank calls it once :meth:`any_failed` said so)."""
        messages = self.gather(None if failure is None else failure.message)
        raise ClipLossInputError(self.describe(messages)) from (failure and failure.cause)

    def describe(self, messages: list[str | None]) -> str:
        if self.size == 1:
            return messages[0] or "accumulate failed"
        return "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)

    def agree_at_entry(self, count: int, error: str | None) -> None:
        """For towers whose DDP wrapper is about to broadcast rank 0's buffers in the first
        forward, which every rank must then make: no rank may refuse to start, and a rank
        without micro-batches (which makes none) cannot take part."""
        entries = self.gather((count, error))
        errors = [e for _, e in entries]
        if any(e is not None for e in errors):
            raise ClipLossInputError(self.describe(errors))
        counts = [c for c, _ in entries]
        if len(set(counts)) > 1:
            raise ClipLossInputError(
                f"ranks hold different numbers of micro-batches ({counts}) and the DDP model "
                "broadcasts its buffers in forward (each rank must then make the same forwards);"
                f" wrap it with {without_buffer_sync()} or give every rank the same number"
            )


def without_buffer_sync() -> str:
    """How the installed torch spells a DDP wrapper that broadcasts no buffers in forward
    (torch 2.13 deprecates ``broadcast_buffers`` for ``forward_sync_buffers``)."""
    names = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    flag = "forward_sync_buffers" if "forward_sync_buffers" in names else "broadcast_buffers"
    return f"DistributedDataParallel(..., {flag}=False)"
