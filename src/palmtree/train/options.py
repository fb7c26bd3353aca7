"""Command-line flags of ``palmtree train`` (open_clip's names where one exists).

:func:`parse_config` parses and cross-checks them once into a frozen
:class:`~.config.TrainConfig`; nothing below it sees the argparse namespace.
"""

from __future__ import annotations

import argparse
import codecs
import math

from ..backends import BACKENDS
from ..options import LOSSES
from ..targets import SAME_LABEL
from .checks import flag_problem
from .config import AUTOCAST_MODES, TrainConfig

DEFAULTS = TrainConfig()

DESCRIPTION = """\
Train a small image encoder and a small text encoder into one embedding space with
palmtree.ClipLoss (--loss clip) or palmtree.SigLipLoss (--loss siglip), across
processes, then evaluate on held-out data. --accum-steps K makes each optimiser step
of K micro-batches per rank, exactly, with palmtree.accumulate.

Default data: the 8x8 handwritten digits scikit-learn ships, with generated captions.
By default it spawns --nproc CPU processes (gloo); under torchrun it uses the launched
world instead (NCCL on GPUs):  torchrun --nproc_per_node N -m palmtree train ...

Outputs go to <logs>/<name>/: metrics.jsonl, results.json, curves.png, and
checkpoints/latest.pt (also kept as epoch_<N>.pt at the end of epoch N). Without --name
each run gets a new folder (runs/clip, runs/clip-2, ...); a --name that holds a run is
refused unless --overwrite replaces it or --resume continues it.
"""


def _checked(kind, ok, requirement: str):
    """An argparse type: ``kind(text)``, refused unless ``ok(value)``."""

    def parse(text: str):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{requirement}, got {text}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "must be a positive integer")
_nonnegative_int = _checked(int, lambda v: v >= 0, "must be >= 0")
# What both numpy's and torch's generators accept.
_seed = _checked(int, lambda v: 0 <= v < 2**63, "must be an integer in [0, 2**63)")
_positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "must be a positive number")
_nonnegative_float = _checked(float, lambda v: math.isfinite(v) and v >= 0, "must be a number >= 0")
_fraction = _checked(float, lambda v: 0 <= v < 1, "must be in [0, 1)")


def _separator(text: str) -> str:
    named = {"tab": "\t", "comma": ",", "semicolon": ";", "space": " "}
    value = named.get(text.lower(), codecs.decode(text, "unicode_escape"))
    if len(value) != 1:
        raise argparse.ArgumentTypeError(
            f"must be one character (or \\t, tab, comma), got {text!r}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="palmtree train",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _data_flags(p.add_argument_group("data"))
    training = p.add_argument_group("training")
    _batch_flags(training)
    _step_flags(training)
    _model_flags(p.add_argument_group("model"))
    _run_flags(p.add_argument_group("run"))
    return p


def _data_flags(data) -> None:
    data.add_argument(
        "--train-data",
        metavar="PATH",
        help="CSV/TSV of image paths and captions (default: sklearn digits)",
    )
    data.add_argument(
        "--val-data", metavar="PATH", help="CSV/TSV for the retrieval evaluation of --train-data"
    )
    data.add_argument(
        "--csv-img-key",
        metavar="KEY",
        default=DEFAULTS.csv_img_key,
        help="image path column (default %(default)s)",
    )
    data.add_argument(
        "--csv-caption-key",
        metavar="KEY",
        default=DEFAULTS.csv_caption_key,
        help="caption column (default %(default)s)",
    )
    data.add_argument(
        "--csv-separator",
        type=_separator,
        default=DEFAULTS.csv_separator,
        help="column separator (default: tab; '\\t', 'tab', ',' or 'comma')",
    )
    data.add_argument(
        "--label-column",
        metavar="NAME",
        help="CSV column of integer item ids, the labels of --same-label (the digits' "
        "labels are their classes)",
    )
    data.add_argument(
        "--image-size",
        type=_positive_int,
        default=DEFAULTS.image_size,
        help="CSV images are resized to SIZE x SIZE RGB (default %(default)s)",
    )
    data.add_argument(
        "--max-bad-fraction",
        type=_fraction,
        default=DEFAULTS.max_bad_fraction,
        help="stop when more than this fraction of CSV rows is bad (default %(default)s)",
    )
    data.add_argument(
        "--test-fraction",
        type=float,
        default=DEFAULTS.test_fraction,
        help="held-out share of the digits, stratified by class (default %(default)s)",
    )
    data.add_argument(
        "--workers",
        type=_nonnegative_int,
        default=DEFAULTS.workers,
        help="data loader processes per rank (default 0: load in the rank)",
    )


def _batch_flags(train) -> None:
    """The loss, and how many pairs a rank trains on per step and in all."""
    train.add_argument(
        "--loss",
        choices=LOSSES,
        default=DEFAULTS.loss,
        help="clip: softmax, palmtree.ClipLoss; siglip: sigmoid, palmtree.SigLipLoss, "
        "with a learned bias (default %(default)s)",
    )
    train.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULTS.batch_size,
        help="pairs per rank and micro-batch (default %(default)s)",
    )
    train.add_argument(
        "--accum-steps",
        type=_positive_int,
        default=DEFAULTS.accum_steps,
        metavar="K",
        help="micro-batches per rank and optimiser step, accumulated exactly with "
        "palmtree.accumulate: a step trains on K x --batch-size pairs per rank "
        "(default %(default)s: no accumulation)",
    )
    train.add_argument(
        "--same-label",
        choices=SAME_LABEL,
        help="give the loss each pair's label (the digit; for CSV data --label-column): "
        "pairs with equal labels anywhere in the global batch are each other's positives "
        "(positive) or leave the loss (ignore); default: no labels, every other pair is a "
        "negative",
    )
    train.add_argument(
        "--epochs", type=_positive_int, default=DEFAULTS.epochs, help="(default %(default)s)"
    )


def _step_flags(train) -> None:
    """The optimiser and its schedule, the precision, the seed and an early stop."""
    train.add_argument(
        "--lr",
        type=_positive_float,
        default=DEFAULTS.lr,
        help="peak AdamW learning rate (default %(default)s)",
    )
    train.add_argument(
        "--wd",
        type=_nonnegative_float,
        default=DEFAULTS.wd,
        help="AdamW weight decay (default %(default)s)",
    )
    train.add_argument(
        "--warmup",
        type=_nonnegative_int,
        default=DEFAULTS.warmup,
        help="linear warm-up steps before the cosine decay (default %(default)s)",
    )
    train.add_argument(
        "--precision",
        choices=AUTOCAST_MODES,
        default=DEFAULTS.precision,
        help="fp32, amp_bf16 (bf16 autocast) or amp (fp16 autocast + GradScaler, CUDA); "
        "the loss is fp32 inside in every mode",
    )
    train.add_argument(
        "--seed",
        type=_seed,
        default=DEFAULTS.seed,
        help="a non-negative integer (default %(default)s)",
    )
    train.add_argument(
        "--max-steps",
        type=_positive_int,
        help="stop after this many optimiser steps in total (the schedule still spans "
        "--epochs); checkpoints/latest.pt is written so that --resume continues",
    )


def _model_flags(model) -> None:
    sizes = (
        ("--image-width", "channels of the CNN's first stage"),
        ("--image-dim", "image tower output dim"),
        ("--text-width", "Transformer width = token latent dim"),
        ("--text-layers", "Transformer layers"),
        ("--text-heads", "attention heads"),
        ("--embed-dim", "shared embedding dim, reached by the loss's projections"),
        ("--context-length", "captions are cut to this many words"),
        ("--vocab-size", "at most this many words in the tokenizer"),
    )
    for flag, what in sizes:
        default = getattr(DEFAULTS, flag[2:].replace("-", "_"))
        model.add_argument(
            flag, type=_positive_int, default=default, help=f"{what} (default {default})"
        )


def _run_flags(run) -> None:
    run.add_argument(
        "--backend",
        choices=BACKENDS,
        default=DEFAULTS.backend,
        help="the loss's backend (default %(default)s)",
    )
    run.add_argument(
        "--nproc",
        type=_positive_int,
        default=DEFAULTS.nproc,
        help="CPU processes to spawn (gloo); ignored under torchrun (default %(default)s)",
    )
    run.add_argument(
        "--logs",
        "--logs-dir",
        dest="logs",
        default=DEFAULTS.logs,
        help="parent folder of the run (default %(default)s); under torchrun spell it "
        "--logs-dir, as torchrun's own --logs-specs makes --logs ambiguous",
    )
    run.add_argument(
        "--name",
        default=DEFAULTS.name,
        help="run folder name (default: a new folder named after --loss: clip, clip-2, ...); "
        "one that holds a run is refused without --overwrite or --resume",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="a fresh run replaces the run already in --name (its metrics, results, "
        "curves and checkpoints)",
    )
    run.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CKPT",
        help="continue the run of --name from CKPT (default: its checkpoints/latest.pt)",
    )
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def parse_config(argv: list[str]) -> TrainConfig:
    """Parses and cross-checks the flags; errors exit with status 2 (argparse's way)."""
    parser = build_parser()
    config = TrainConfig(**vars(parser.parse_args(argv)))
    problem = flag_problem(config)
    if problem:
        parser.error(problem)
    return config
