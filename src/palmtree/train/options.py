"""Command-line flags of ``palmtree train`` (open_clip's names where one exists)."""

from __future__ import annotations

import argparse
import codecs
import math
import os

import torch

from palmtree.backends import BACKENDS, fused_can_run
from palmtree.distributed import launched_world

PRECISIONS = ("fp32", "amp_bf16", "amp")

DESCRIPTION = """\
Train a small image encoder and a small text encoder into one embedding space with
palmtree.ClipLoss, across processes, then evaluate on held-out data.

Default data: the 8x8 handwritten digits scikit-learn ships, with generated captions.
By default it spawns --nproc CPU processes (gloo); under torchrun it uses the launched
world instead (NCCL on GPUs):  torchrun --nproc_per_node N -m palmtree train ...
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


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
    data = p.add_argument_group("data")
    data.add_argument(
        "--train-data",
        metavar="PATH",
        default=None,
        help="CSV/TSV of image paths and captions (default: sklearn digits)",
    )
    data.add_argument(
        "--val-data",
        metavar="PATH",
        default=None,
        help="CSV/TSV for the retrieval evaluation of --train-data runs",
    )
    data.add_argument(
        "--csv-img-key",
        metavar="KEY",
        default="filepath",
        help="image path column (default filepath)",
    )
    data.add_argument(
        "--csv-caption-key", metavar="KEY", default="title", help="caption column (default title)"
    )
    data.add_argument(
        "--csv-separator",
        type=_separator,
        default="\t",
        help="column separator (default: tab; '\\t', 'tab', ',' or 'comma')",
    )
    data.add_argument(
        "--image-size",
        type=_positive_int,
        default=32,
        help="CSV images are resized to SIZE x SIZE RGB (default 32)",
    )
    data.add_argument(
        "--max-bad-fraction",
        type=_fraction,
        default=0.1,
        help="stop when more than this fraction of CSV rows is bad (default 0.1)",
    )
    data.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="held-out share of the digits, stratified by class (default 0.2)",
    )
    data.add_argument(
        "--workers",
        type=_nonnegative_int,
        default=0,
        help="data loader processes per rank (default 0: load in the rank)",
    )

    train = p.add_argument_group("training")
    train.add_argument(
        "--batch-size", type=_positive_int, default=64, help="pairs per rank and step (default 64)"
    )
    train.add_argument("--epochs", type=_positive_int, default=20, help="(default 20)")
    train.add_argument(
        "--lr", type=_positive_float, default=2e-3, help="peak AdamW learning rate (default 2e-3)"
    )
    train.add_argument(
        "--wd", type=_nonnegative_float, default=0.1, help="AdamW weight decay (default 0.1)"
    )
    train.add_argument(
        "--warmup",
        type=_nonnegative_int,
        default=20,
        help="linear warm-up steps before the cosine decay (default 20)",
    )
    train.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32, amp_bf16 (bf16 autocast) or amp (fp16 autocast, CUDA)",
    )
    train.add_argument("--seed", type=int, default=0, help="(default 0)")
    train.add_argument(
        "--max-steps",
        type=_positive_int,
        default=None,
        help="stop after this many steps in total (the schedule still spans "
        "--epochs); a checkpoint is written so --resume continues",
    )

    model = p.add_argument_group("model")
    model.add_argument(
        "--image-width",
        type=_positive_int,
        default=32,
        help="channels of the CNN's first stage (default 32)",
    )
    model.add_argument(
        "--text-width",
        type=_positive_int,
        default=64,
        help="Transformer width = token latent dim (default 64)",
    )
    model.add_argument("--text-layers", type=_positive_int, default=2, help="(default 2)")
    model.add_argument("--text-heads", type=_positive_int, default=4, help="(default 4)")
    model.add_argument(
        "--image-dim", type=_positive_int, default=128, help="image tower output dim (default 128)"
    )
    model.add_argument(
        "--embed-dim",
        type=_positive_int,
        default=64,
        help="shared embedding dim, reached by ClipLoss's projections (default 64)",
    )
    model.add_argument(
        "--context-length",
        type=_positive_int,
        default=32,
        help="captions are cut to this many words (default 32)",
    )
    model.add_argument(
        "--vocab-size",
        type=_positive_int,
        default=10000,
        help="at most this many words in the tokenizer (default 10000)",
    )

    run = p.add_argument_group("run")
    run.add_argument(
        "--backend", choices=BACKENDS, default="auto", help="ClipLoss backend (default auto)"
    )
    run.add_argument(
        "--nproc",
        type=_positive_int,
        default=2,
        help="CPU processes to spawn (gloo); ignored under torchrun (default 2)",
    )
    run.add_argument(
        "--logs",
        "--logs-dir",
        dest="logs",
        default="runs",
        help="parent folder of the run (default runs); under torchrun spell it "
        "--logs-dir, as torchrun's own --logs-specs makes --logs ambiguous",
    )
    run.add_argument("--name", default="demo", help="run folder name (default demo)")
    run.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CKPT",
        help="continue from CKPT (default: the run's latest checkpoint)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parses and cross-checks the flags; errors exit with status 2 (argparse's way)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.test_fraction < 1:
        parser.error(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if args.train_data is None and args.val_data is not None:
        parser.error("--val-data needs --train-data (the digits hold out their own test split)")
    for flag in ("train_data", "val_data"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            parser.error(f"--{flag.replace('_', '-')}: no such file: {path}")
    if args.text_width % args.text_heads:
        parser.error(
            f"--text-width {args.text_width} must be divisible by --text-heads {args.text_heads}"
        )
    if not args.name or os.sep in args.name or args.name in (".", ".."):
        parser.error(f"--name must be a plain folder name, got {args.name!r}")
    on_gpu = _ranks_use_cuda()
    if args.precision == "amp" and not on_gpu:
        parser.error(
            "--precision amp (fp16) needs CUDA ranks (torchrun on GPUs); use amp_bf16 or fp32"
        )
    if args.backend == "fused" and not fused_can_run(torch.device("cuda" if on_gpu else "cpu")):
        parser.error(
            "--backend fused needs CUDA ranks (torchrun on GPUs) and Triton; the spawned "
            "ranks run on CPU: use --backend auto or chunked"
        )
    return args


def _ranks_use_cuda() -> bool:
    """Spawned ranks run on CPU; torchrun ranks use CUDA when there is one."""
    return launched_world() and torch.cuda.is_available()
