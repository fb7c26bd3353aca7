"""Training data: the scikit-learn digits with generated captions, or a CSV/TSV of your own.

Both come out as a :class:`CaptionedImages` dataset whose items are ``(image [C, H, W],
token ids, group)``; ``group`` says which items describe the same thing (the digit, or
the caption text for CSV data) and decides retrieval hits in the evaluation.
:class:`GlobalBatchSampler` splits every global batch over the ranks without padding.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .tokenizer import WordTokenizer, pad_batch


class TrainError(RuntimeError):
    """A problem with the user's flags or data, reported without a traceback."""


# --------------------------------------------------------------------------- digits

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {w}: "seven", {d}: "7", {a}: "a seven" / "an eight". Varied wording and length so
# that text masks carry real padding.
TRAIN_TEMPLATES = (
    "{w}",
    "digit {d}",
    "a handwritten {w}",
    "the digit {d} written by hand",
    "a photo of the number {w}",
    "an image of {a}",
    "the number {w} drawn with a pen",
    "a black and white picture of the digit {w}",
    "someone wrote the number {d}",
    "a low resolution scan of a handwritten {d}",
    "a small blurry {w}",
    "this is {a} , written in ink",
)
# Used only for evaluation (zero-shot prompts and retrieval captions); some of their
# words ("scanned", "drawing", ...) never occur in training and map to <unk>.
EVAL_TEMPLATES = (
    "a scanned image of the number {w}",
    "the handwritten digit {w}",
    "a picture of {a} written by hand",
    "a drawing of the digit {d}",
    "number {w}",
)


def caption(template: str, digit: int) -> str:
    word = WORDS[digit]
    article = f"an {word}" if word[0] in "aeiou" else f"a {word}"
    return template.format(w=word, d=digit, a=article)


def class_captions(templates: tuple[str, ...]) -> list[list[str]]:
    """``[10][len(templates)]`` captions, one list per digit."""
    return [[caption(t, d) for t in templates] for d in range(10)]


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 digits scikit-learn ships (no download).

    Returns ``(images [N, 8, 8] with values 0..16, labels [N])``. Reads the file that
    ``sklearn.datasets.load_digits`` reads, without importing scikit-learn (which
    costs over a second); falls back to ``load_digits`` if the file has moved.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise TrainError(
            "the default data are scikit-learn's digits: pip install scikit-learn "
            "(or the project's [train] extra), or pass --train-data"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets/data/digits.csv.gz"
    if path.is_file():
        data = np.loadtxt(path, delimiter=",", dtype=np.float32)
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)`` with each class split in the same proportion."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


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
        return self.load_image(i), self.captions[i][self.choice[i]], int(self.groups[i])


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
    """Stacks images and pads token ids; an empty batch gives correctly shaped empty tensors."""

    def __init__(self, image_shape: tuple[int, ...]) -> None:
        self.image_shape = tuple(image_shape)

    def __call__(self, items):
        if not items:
            images = torch.empty((0, *self.image_shape))
        else:
            images = torch.stack([item[0] for item in items])
        ids, mask = pad_batch([item[1] for item in items])
        groups = torch.tensor([item[2] for item in items], dtype=torch.int64)
        return {"images": images, "ids": ids, "mask": mask, "groups": groups}


# --------------------------------------------------------------------------- sampler


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's share of every global batch, never padding with duplicates.

    Each epoch shuffles all ``n`` indices with ``(seed, epoch)`` and cuts them into
    global batches of ``batch_size * world_size``; rank ``r`` takes the ``r``-th
    ``batch_size`` slice of each. The last global batch is short, so some ranks get
    fewer items or none (``[]``), which :class:`palmtree.ClipLoss` handles exactly.
    ``torch.utils.data.DistributedSampler`` would instead repeat samples to even out
    the ranks, putting duplicate pairs (false negatives) into the last batch.
    Every rank yields the same number of batches, so collectives stay in step.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Selects the epoch's order; ``start_step`` skips batches already trained on."""
        self.epoch, self.start_step = epoch, start_step

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        return max(0, math.ceil(self.n / self.global_batch) - self.start_step)

    def __iter__(self):
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, 11]).permutation(self.n)
        else:
            order = np.arange(self.n)
        steps = math.ceil(self.n / self.global_batch)
        for step in range(self.start_step, steps):
            start = step * self.global_batch + self.rank * self.batch_size
            end = min(start + self.batch_size, (step + 1) * self.global_batch, self.n)
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


def prepare_digits(
    test_fraction: float,
    seed: int,
    context_length: int,
    vocab_size: int,
    tokenizer: WordTokenizer | None = None,
) -> Prepared:
    images, labels = load_digits_arrays()
    train_idx, test_idx = stratified_split(labels, test_fraction, seed=0)
    pixels = torch.from_numpy(images).div(8.0).sub(1.0).unsqueeze(1)  # [N, 1, 8, 8] in [-1, 1]
    train_caps, eval_caps = class_captions(TRAIN_TEMPLATES), class_captions(EVAL_TEMPLATES)
    if tokenizer is None:
        tokenizer = WordTokenizer.build(
            [c for caps in train_caps for c in caps], context_length, vocab_size
        )
    train_ids = [[tokenizer.encode(c) for c in caps] for caps in train_caps]
    eval_ids = [[tokenizer.encode(c) for c in caps] for caps in eval_caps]
    train = CaptionedImages(
        captions=[train_ids[y] for y in labels[train_idx]],
        groups=labels[train_idx],
        images=pixels[train_idx],
        seed=seed,
    )
    # Each test image is paired with one held-out caption of its digit, fixed for all runs.
    pick = np.random.default_rng(1).integers(0, len(EVAL_TEMPLATES), len(test_idx))
    test = CaptionedImages(
        captions=[[eval_ids[y][k]] for y, k in zip(labels[test_idx], pick, strict=True)],
        groups=labels[test_idx],
        images=pixels[test_idx],
        seed=seed,
    )
    report = {
        "dataset": "sklearn digits (8x8)",
        "train_size": len(train_idx),
        "test_size": len(test_idx),
        "train_templates": len(TRAIN_TEMPLATES),
        "eval_templates": len(EVAL_TEMPLATES),
        "vocab_size": len(tokenizer),
    }
    return Prepared(train, test, tokenizer, 1, "digits", eval_ids, report)


@dataclass
class CsvRows:
    paths: list[str]
    captions: list[str]
    bad: list[tuple[int, str, str]]  # (line number, reason, path)
    total: int


def read_csv_rows(
    path: str, img_key: str, caption_key: str, separator: str, check_images: bool = True
) -> CsvRows:
    """Reads and validates a CSV/TSV; bad rows are collected, not raised."""
    if not os.path.isfile(path):
        raise TrainError(f"--train-data/--val-data file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    paths, captions, bad = [], [], []
    total = 0
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=separator)
        header = reader.fieldnames or []
        missing = [k for k in (img_key, caption_key) if k not in header]
        if missing:
            raise TrainError(
                f"{path}: column(s) {', '.join(map(repr, missing))} not found; the header "
                f"holds {header} (separator {separator!r}); set --csv-img-key, "
                "--csv-caption-key or --csv-separator"
            )
        for line, row in enumerate(reader, start=2):
            total += 1
            file = (row.get(img_key) or "").strip()
            text = (row.get(caption_key) or "").strip()
            if file and not os.path.isabs(file) and not os.path.exists(file):
                file = os.path.join(base, file)
            if not text:
                bad.append((line, "empty caption", file))
            elif not file or not os.path.isfile(file):
                bad.append((line, "missing file", file))
            elif check_images and not _image_readable(file):
                bad.append((line, "unreadable image", file))
            else:
                paths.append(file)
                captions.append(text)
    return CsvRows(paths, captions, bad, total)


def _image_readable(path: str) -> bool:
    from PIL import Image

    try:  # a full decode: verify() alone lets truncated JPEGs through
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


def check_bad_rows(rows: CsvRows, path: str, max_bad_fraction: float) -> dict:
    """Summarises bad rows; raises :class:`TrainError` above the threshold."""
    counts = Counter(reason for _, reason, _ in rows.bad)
    report = {"rows": rows.total, "bad_rows": len(rows.bad), "bad_by_reason": dict(counts)}
    examples = [f"line {line}: {reason} ({file or '-'})" for line, reason, file in rows.bad[:5]]
    report["bad_examples"] = examples
    fraction = len(rows.bad) / max(rows.total, 1)
    if rows.total == 0 or not rows.paths:
        raise TrainError(f"{path}: no usable rows ({rows.total} rows, {len(rows.bad)} bad)")
    if fraction > max_bad_fraction:
        raise TrainError(
            f"{path}: {len(rows.bad)} of {rows.total} rows are bad ({fraction:.1%}), above "
            f"--max-bad-fraction {max_bad_fraction:g}: "
            + ", ".join(f"{n} {reason}" for reason, n in counts.items())
            + "; first: "
            + "; ".join(examples)
        )
    return report


def prepare_csv(
    train_path: str,
    val_path: str | None,
    img_key: str,
    caption_key: str,
    separator: str,
    image_size: int,
    max_bad_fraction: float,
    seed: int,
    context_length: int,
    vocab_size: int,
    tokenizer: WordTokenizer | None = None,
) -> Prepared:
    rows = read_csv_rows(train_path, img_key, caption_key, separator)
    report = {"dataset": train_path, "train": check_bad_rows(rows, train_path, max_bad_fraction)}
    if tokenizer is None:
        tokenizer = WordTokenizer.build(rows.captions, context_length, vocab_size)
    train = _csv_dataset(rows, tokenizer, image_size, seed)
    test = None
    if val_path:
        val_rows = read_csv_rows(val_path, img_key, caption_key, separator)
        report["val"] = check_bad_rows(val_rows, val_path, max_bad_fraction)
        test = _csv_dataset(val_rows, tokenizer, image_size, seed)
    report.update(train_size=len(train), test_size=len(test) if test else 0)
    report["vocab_size"] = len(tokenizer)
    return Prepared(train, test, tokenizer, 3, "csv", None, report)


def _csv_dataset(rows: CsvRows, tokenizer: WordTokenizer, image_size: int, seed: int):
    # Items with the same caption text form one retrieval group.
    group_of: dict[str, int] = {}
    groups = np.array([group_of.setdefault(c, len(group_of)) for c in rows.captions])
    return CaptionedImages(
        captions=[[tokenizer.encode(c)] for c in rows.captions],
        groups=groups,
        paths=rows.paths,
        image_size=image_size,
        seed=seed,
    )
