"""Your own data: a CSV/TSV of image paths and captions (open_clip's column flags).

Rows with a missing file, an image Pillow cannot decode, an empty caption or a caption
that is not UTF-8 are counted, reported and skipped; too many of them stop the run.
``--label-column`` names a column of integer item ids (the labels of ``--same-label``);
a missing column, or a kept row whose id is not an integer, stops the run.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .data import CaptionedImages, Prepared, TrainError
from .tokenizer import WordTokenizer


@dataclass
class CsvRows:
    paths: list[str]
    captions: list[str]
    bad: list[tuple[int, str, str]]  # (line number, reason, path)
    total: int
    labels: list[int] | None = None  # the --label-column ids of the kept rows


#: What ``torch.int64`` holds, the loss's labels.
INT64 = (-(2**63), 2**63 - 1)


def read_csv_rows(
    path: str,
    img_key: str,
    caption_key: str,
    separator: str,
    check_images: bool = True,
    label_key: str | None = None,
) -> CsvRows:
    """Reads and validates a CSV/TSV; bad rows are collected, not raised. With
    ``label_key`` each kept row's id is read from that column (:func:`label_of`)."""
    if not os.path.isfile(path):
        raise TrainError(f"--train-data/--val-data file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    rows = CsvRows([], [], [], 0, None if label_key is None else [])
    # Bytes that are not UTF-8 decode to lone surrogates (surrogateescape): a path
    # keeps its exact bytes for the file system, and a caption with them is a bad row.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f, delimiter=separator)
        _check_header(path, reader.fieldnames or [], img_key, caption_key, label_key, separator)
        for line, row in enumerate(reader, start=2):
            rows.total += 1
            file = (row.get(img_key) or "").strip()
            text = (row.get(caption_key) or "").strip()
            if file and not os.path.isabs(file) and not os.path.exists(file):
                file = os.path.join(base, file)
            if not text:
                rows.bad.append((line, "empty caption", file))
            elif not _is_utf8(text):
                rows.bad.append((line, "caption not UTF-8", file))
            elif not file or not os.path.isfile(file):
                rows.bad.append((line, "missing file", file))
            elif check_images and not _image_readable(file):
                rows.bad.append((line, "unreadable image", file))
            else:
                rows.paths.append(file)
                rows.captions.append(text)
                if label_key is not None:
                    rows.labels.append(label_of(row.get(label_key), path, line, label_key))
    return rows


def _check_header(path, header, img_key, caption_key, label_key, separator) -> None:
    missing = [k for k in (img_key, caption_key) if k not in header]
    if missing:
        raise TrainError(
            f"{path}: column(s) {', '.join(map(repr, missing))} not found; the header "
            f"holds {header} (separator {separator!r}); set --csv-img-key, "
            "--csv-caption-key or --csv-separator"
        )
    if label_key is not None and label_key not in header:
        raise TrainError(
            f"{path}: --label-column {label_key!r} not found; the header holds {header} "
            f"(separator {separator!r})"
        )


def label_of(text: str | None, path: str, line: int, key: str) -> int:
    """The integer id in a row's ``--label-column`` cell, or a :class:`TrainError` that
    names the file, the line, the column and the value."""
    value = (text or "").strip()
    try:
        label = int(value)
    except ValueError:
        label = None
    if label is None or not INT64[0] <= label <= INT64[1]:
        raise TrainError(
            f"{path}, line {line}: --label-column {key!r} holds {value!r}, not an integer "
            "id; the column must hold one integer (int64) per row, equal for pairs of "
            "one item"
        )
    return label


def _is_utf8(text: str) -> bool:
    """Whether ``text`` came from valid UTF-8 (no surrogate-escaped bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    label_key: str | None = None,
) -> Prepared:
    rows = read_csv_rows(train_path, img_key, caption_key, separator, label_key=label_key)
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
    if rows.labels is not None:
        report.update(label_column=label_key, distinct_labels=len(set(rows.labels)))
    report["vocab_size"] = len(tokenizer)
    return Prepared(train, test, tokenizer, 3, "csv", None, report)


def _csv_dataset(rows: CsvRows, tokenizer: WordTokenizer, image_size: int, seed: int):
    # Items with the same caption text form one retrieval group.
    group_of: dict[str, int] = {}
    groups = np.array([group_of.setdefault(c, len(group_of)) for c in rows.captions])
    labels = None if rows.labels is None else np.array(rows.labels, dtype=np.int64)
    return CaptionedImages(
        captions=[[tokenizer.encode(c)] for c in rows.captions],
        groups=groups,
        labels=labels,
        paths=rows.paths,
        image_size=image_size,
        seed=seed,
    )
