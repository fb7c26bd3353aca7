"""The default data: the 1797 8x8 digits scikit-learn ships, with generated captions.

Each digit has 12 training caption templates and 5 more kept for evaluation only; 20 %
of the images (by default) are held out, stratified by class, with a split that does
not depend on ``--seed``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from .data import CaptionedImages, Prepared, TrainError
from .tokenizer import WordTokenizer

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


def check_digit_split(labels, train_idx, test_idx, test_fraction: float) -> None:
    """Raises :class:`TrainError` unless both sides of the split hold every digit.

    The evaluation needs held-out images of each digit, and training needs some too: a
    fraction so small (or so large) that one side of a class rounds to nothing would
    otherwise crash in the evaluation or train for zero steps.
    """
    classes = np.unique(labels)
    empty = [
        side
        for side, idx in (("held out", test_idx), ("left for training", train_idx))
        if len(np.unique(labels[idx])) < len(classes)
    ]
    if empty:
        raise TrainError(
            f"--test-fraction {test_fraction:g} leaves no image of some digits "
            f"{' or '.join(empty)} ({len(test_idx)} of {len(labels)} held out); "
            "every digit needs at least one image on each side"
        )


def prepare_digits(
    test_fraction: float,
    seed: int,
    context_length: int,
    vocab_size: int,
    tokenizer: WordTokenizer | None = None,
) -> Prepared:
    images, labels = load_digits_arrays()
    train_idx, test_idx = stratified_split(labels, test_fraction, seed=0)
    check_digit_split(labels, train_idx, test_idx, test_fraction)
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
        labels=labels[train_idx],  # the digit: what --same-label compares
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
