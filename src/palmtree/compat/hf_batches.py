"""Every rank's share of each global batch, for :class:`palmtree.compat.transformers.Trainer`.

A contrastive loss depends on which pairs meet in a global batch, so the batches must be
the dataset's own: accelerate's default sharding pads the last global batch with samples
from the start of the epoch (``even_batches=True``: duplicated pairs become each other's
negatives), and ``even_batches=False`` can leave a rank one batch short, which waits for
the loss's exchange while the others have finished the epoch. :class:`GlobalBatches`
gives every rank the same number of batches; the last global batch (``drop_last=False``)
is split as evenly as the ranks allow, so its pieces may differ by one pair.

Imports ``transformers`` (for the one base class below); imported on demand only.
"""

from __future__ import annotations

import warnings

import torch
from transformers.trainer_pt_utils import BatchRebalanceSampler


def rank_sizes(size: int, per_rank: int, world_size: int, drop_last: bool):
    """``(sizes, left_out)``: ``sizes[k][r]`` is rank ``r``'s number of pairs in global batch
    ``k``; ``left_out`` is how many of the ``size`` pairs no batch holds (a last global
    batch of fewer pairs than ranks: each rank needs at least one)."""
    full, tail = divmod(size, per_rank * world_size)
    sizes = [[per_rank] * world_size for _ in range(full)]
    if drop_last or tail == 0:
        return sizes, tail
    if tail < world_size:
        return sizes, tail
    small, extra = divmod(tail, world_size)
    sizes.append([small + (r < extra) for r in range(world_size)])
    return sizes, 0


class GlobalBatches(BatchRebalanceSampler):
    """A batch sampler that is already rank-aware: rank ``rank`` yields its consecutive
    piece of each global batch of ``per_rank * world_size`` pairs of one epoch's order
    (a permutation seeded by ``seed + epoch``, the same on every rank, or the dataset's
    order), and every rank yields the same number of batches.

    It derives from transformers' ``BatchRebalanceSampler`` only because that is how
    ``Trainer`` recognises a batch sampler that must not be sharded again (it passes it as
    the DataLoader's ``batch_sampler`` and turns accelerate's sharding off for it); none
    of that class's behaviour (cost balancing, padding) is used. ``Trainer`` reaches
    :meth:`set_epoch` itself. It has no ``batch_size`` attribute, as the base has none:
    accelerate then yields its batches whatever their sizes.
    """

    def __init__(
        self,
        size: int,
        per_rank: int,
        world_size: int,
        rank: int,
        *,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        what: str = "training",
    ):
        if per_rank < 1:
            raise ValueError(f"the batch size per device must be >= 1, got {per_rank}")
        self.size, self.per_rank, self.world_size, self.rank = size, per_rank, world_size, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.sizes, left_out = rank_sizes(size, per_rank, world_size, drop_last)
        if left_out and not drop_last:
            warnings.warn(
                f"palmtree: {left_out} pair(s) of the {what} dataset ({size} pairs) are left "
                f"out of every epoch: they would form a last global batch of fewer pairs than "
                f"the {world_size} ranks, and a rank cannot hold an empty batch; choose sizes "
                f"that leave none or at least {world_size} pairs over (or dataloader_drop_last)",
                UserWarning,
                stacklevel=3,
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sizes)

    def order(self) -> list[int]:
        """This epoch's order of the dataset's indices (identical on every rank)."""
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self):
        order, start = self.order(), 0
        for sizes in self.sizes:
            mine = start + sum(sizes[: self.rank])
            yield order[mine : mine + sizes[self.rank]]
            start += sum(sizes)


def unsharded(dataloader, sampler: GlobalBatches | None):
    """``dataloader``, after checking that accelerate did not shard ``sampler`` again (a
    RuntimeError if a transformers/accelerate version does: silently dropped pairs)."""
    if sampler is None:
        return dataloader
    found = getattr(dataloader, "batch_sampler", None)
    if found is sampler:
        return dataloader
    if getattr(found, "batch_sampler", None) is sampler and getattr(found, "num_processes", 1) == 1:
        return dataloader
    raise RuntimeError(
        "palmtree.compat.transformers: this version of transformers/accelerate shards the "
        "rank-aware batch sampler again (each rank would see only part of its batches); "
        "the versions palmtree supports are in its 'transformers' extra"
    )
