"""What the ranks train on, whichever the source (:mod:`.digits` or :mod:`.csv_data`).

Both sources come out as a :class:`CaptionedImages` dataset whose items are ``(image
[C, H, W], token ids, group, label)``; ``group`` says which items describe the same thing
(the digit, or the caption text for CSV data) and decides retrieval hits in the
evaluation; ``label`` is the item id the loss gets with ``--same-label`` (the digit, or
``--label-column``; ``None`` for CSV data without one).
:class:`GlobalBatchSampler` splits every global batch over the ranks without padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .tokenizer import WordTokenizer, pad_batch


class TrainError(RuntimeError):
    """A problem with the user's flags or data, reported without a traceback."""


# --------------------------------------------------------------------------- dataset


@dataclass
class CaptionedImages(torch.utils.data.Dataset):
    """Images with one or more candidate captions each.

    Either ``images`` (an in-memory ``[N, C, H, W]`` float tensor) or ``paths`` (read
    with Pillow, converted to RGB, resized to ``image_size``) holds the pixels.
    ``captions[i]`` lists item ``i``'s candidate token-id lists; which one an epoch uses
    is drawn from ``(seed, epoch)`` in :meth:`set_epoch`, so any rank, any worker and
    a resumed run see the same caption for the same item.
    """

    captions: list[list[list[int]]]
    groups: np.ndarray
    labels: np.ndarray | None = None  # the loss's item ids (--same-label)
    images: torch.Tensor | None = None
    paths: list[str] | None = None
    image_size: int = 32
    seed: int = 0
    choice: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.set_epoch(0)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self.images is not None:
            return tuple(self.images.shape[1:])
        return (3, self.image_size, self.image_size)

    def set_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, epoch, 7])
        counts = np.array([len(c) for c in self.captions], dtype=np.int64)
        self.choice = (rng.random(len(counts)) * counts).astype(np.int64)

    def load_image(self, i: int) -> torch.Tensor:
        if self.images is not None:
            return self.images[i]
        return load_image_file(self.paths[i], self.image_size)

    def __getitem__(self, i: int):
        label = None if self.labels is None else int(self.labels[i])
        return self.load_image(i), self.captions[i][self.choice[i]], int(self.groups[i]), label


def load_image_file(path: str, size: int) -> torch.Tensor:
    """``[3, size, size]`` float in [-1, 1]."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
            pixels = np.asarray(im, dtype=np.float32)
    except Exception as exc:  # the file changed after validation
        raise TrainError(f"cannot read image {path}: {exc}") from exc
    return torch.from_numpy(pixels).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


class Collate:
    """Stacks images and pads token ids; an empty batch gives correctly shaped empty tensors.
    With ``labels`` the batch also holds the items' labels (``[b]`` int64)."""

    def __init__(self, image_shape: tuple[int, ...], labels: bool = False) -> None:
        self.image_shape = tuple(image_shape)
        self.labels = labels

    def __call__(self, items):
        if not items:
            images = torch.empty((0, *self.image_shape))
        else:
            images = torch.stack([item[0] for item in items])
        ids, mask = pad_batch([item[1] for item in items])
        groups = torch.tensor([item[2] for item in items], dtype=torch.int64)
        batch = {"images": images, "ids": ids, "mask": mask, "groups": groups}
        if self.labels:
            batch["labels"] = torch.tensor([item[3] for item in items], dtype=torch.int64)
        return batch


# --------------------------------------------------------------------------- sampler


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches of every global batch, never padding with duplicates.

    Each epoch shuffles all ``n`` indices with ``(seed, epoch)`` and cuts them into
    global batches, one per optimiser step, of ``batch_size * accum_steps * world_size``;
    rank ``r`` takes the ``r``-th slice of ``batch_size * accum_steps`` of each and yields
    it as ``accum_steps`` micro-batches of ``batch_size``. So a step trains on the same
    pairs, held by the same ranks, however ``batch_size * accum_steps`` is factored.

    The last global batch is short, so some ranks get fewer items or none (``[]``),
    which the palmtree losses handle exactly. ``torch.utils.data.DistributedSampler``
    would instead repeat samples to even out the ranks, putting duplicate pairs (false
    negatives) into the last batch. Every rank yields ``accum_steps`` lists per step,
    empty ones included, so collectives stay in step.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        accum_steps: int = 1,
    ) -> None:
        if batch_size < 1 or accum_steps < 1:
            raise ValueError(f"batch_size {batch_size} and accum_steps {accum_steps} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle, self.accum_steps = seed, shuffle, accum_steps
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Selects the epoch's order; ``start_step`` skips the steps already trained on."""
        self.epoch, self.start_step = epoch, start_step

    @property
    def global_batch(self) -> int:
        """Pairs per optimiser step, over all ranks."""
        return self.batch_size * self.accum_steps * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.global_batch)

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start_step) * self.accum_steps

    def __iter__(self):
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, 11]).permutation(self.n)
        else:
            order = np.arange(self.n)
        share = self.batch_size * self.accum_steps  # this rank's pairs per step
        for step in range(self.start_step, self.steps_per_epoch):
            first = step * self.global_batch + self.rank * share
            stop = min(first + share, (step + 1) * self.global_batch, self.n)
            for k in range(self.accum_steps):
                start = first + k * self.batch_size
                end = min(start + self.batch_size, stop)
                yield order[start:end].tolist() if end > start else []


# --------------------------------------------------------------------------- preparation


@dataclass
class Prepared:
    """Everything the ranks need, built once (in the launcher) and pickled to them."""

    train: CaptionedImages
    test: CaptionedImages | None
    tokenizer: WordTokenizer
    in_channels: int
    kind: str  # "digits" or "csv"
    # digits only: token ids of the held-out templates, [10][n_templates]
    class_prompts: list[list[list[int]]] | None = None
    report: dict = field(default_factory=dict)
