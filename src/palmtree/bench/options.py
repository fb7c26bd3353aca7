"""``palmtree bench``'s flags: each value checked as it is parsed, every default in ``--help``.

A bad value stops the command at once, before any case runs, with one line on stderr
(``palmtree bench: error: argument --dims: must be an integer >= 1, got 0``) and exit
status 2. What needs more than one flag (the device, the output folder, an empty plan) is
checked by :func:`palmtree.bench.cli.parse`, through the same one-line error.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch

from ..options import LOSSES
from ..precision import PRECISIONS
from ..targets import SAME_LABEL
from . import peers
from .cases import BENCH_BACKENDS, DEFAULTS, LOG_SCALE, QUICK, SIGLIP_BIAS, SIGLIP_LOG_SCALE
from .compiled import COMPILED

#: Where results go unless ``--out`` says otherwise (ignored by git).
DEFAULT_OUT = Path("runs/bench")
#: The log-temperature of the inputs per loss: each loss's model's initial value.
LOG_SCALES = {"clip": LOG_SCALE, "siglip": SIGLIP_LOG_SCALE}
#: ``--logit-scale``'s range: a temperature ``exp(logit_scale)`` from the smallest normal
#: float32 (below it the scale rounds to 0 or loses its digits, and so does its gradient)
#: to palmtree's cap, 100 (the peers do not cap it: above, they compute another loss).
LOG_SCALE_RANGE = (math.log(2.0**-126), math.log(100.0))
DEFAULT_CASE_TIMEOUT = 1800.0
#: A file stem: a letter or digit, then letters, digits, ``.``, ``_``, ``-``.
STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_FLOAT32_MAX = torch.finfo(torch.float32).max


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line and exit with status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _checked(kind, ok, requirement: str):
    """An argparse type: ``kind(text)``, refused (one line) unless ``ok(value)``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{requirement}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{requirement}, got {text}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "must be an integer >= 1")
_nonnegative_int = _checked(int, lambda v: v >= 0, "must be an integer >= 0")
_seed = _checked(int, lambda v: 0 <= v < 2**63, "must be an integer in [0, 2**63)")
_seconds = _checked(float, lambda v: math.isfinite(v) and v > 0, "must be a number of seconds > 0")
_log_scale = _checked(
    float,
    lambda v: LOG_SCALE_RANGE[0] <= v <= LOG_SCALE_RANGE[1],  # refuses nan too
    f"must lie in [ln 2**-126, ln 100] = [{LOG_SCALE_RANGE[0]:.2f}, {LOG_SCALE_RANGE[1]:.4f}] "
    "(the temperature from float32's smallest normal number to palmtree's cap, which the "
    "peers do not apply)",
)
_labels = _checked(int, lambda v: v >= 1, "must be an integer >= 1 (leave it out for no labels)")
_ratio = _checked(float, lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0")
_bias = _checked(float, lambda v: abs(v) <= _FLOAT32_MAX, "must be a finite float32 number")
_stem = _checked(
    str,
    lambda v: STEM.fullmatch(v) is not None,
    "must be a file name (letters, digits, '.', '_', '-'; no folder)",
)


def _words(values) -> str:
    return " ".join(str(v) for v in values) if isinstance(values, list) else str(values)


def _per_device(key: str) -> str:
    """The default of ``key`` on each device, and under ``--quick`` where it changes."""
    cpu, cuda = _words(DEFAULTS["cpu"][key]), _words(DEFAULTS["cuda"][key])
    text = (
        f"default {cpu} on a CPU, {cuda} on CUDA"
        if cpu != cuda
        else f"default {cpu} on a CPU and on CUDA"
    )
    return text + (f"; --quick: {_words(QUICK[key])}" if key in QUICK else "")


def build_parser() -> Parser:
    p = Parser(
        prog="palmtree bench",
        description="Forward+backward time (median and interquartile range of the timed "
        "runs) and peak memory of the CLIP (or SigLIP) loss per backend, precision and peer; "
        "appends one CSV row per case as it ends, then redraws a table and a log-log plot.",
    )
    _what_flags(p)
    _target_flags(p)
    _how_flags(p)
    _output_flags(p)
    p.add_argument("--case", help=argparse.SUPPRESS)
    return p


def _what_flags(p: Parser) -> None:
    p.add_argument(
        "--loss",
        choices=LOSSES,
        default="clip",
        help="clip: the softmax loss (clip_loss; peers open_clip's ClipLoss, Inf-CL); "
        "siglip: the sigmoid loss (siglip_loss; peer open_clip's SigLipLoss). Default clip",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="default cuda when available")
    size = dict(type=_positive_int, nargs="+")
    p.add_argument(
        "--batch-sizes",
        **size,
        metavar="B",
        help=f"global batch sizes ({_per_device('batch_sizes')})",
    )
    p.add_argument("--dims", **size, metavar="D", help=f"feature widths ({_per_device('dims')})")
    p.add_argument(
        "--backends",
        nargs="*",
        choices=BENCH_BACKENDS,
        help=f"palmtree's backends, and {COMPILED}: chunked's loss (forward and backward) "
        "under torch.compile, static shapes, compiled before timing (the compile time is in "
        "the row's note); backend='auto' never picks it. Default reference chunked, plus "
        f"{COMPILED} and fused on CUDA with Triton (on a CPU Inductor's C++ build takes "
        "minutes at large B: name it)",
    )
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, help=_per_device("precisions"))
    p.add_argument(
        "--peers",
        nargs="*",
        choices=peers.PEERS,
        help="peer implementations (default: those that can run here; '--peers' alone: none)",
    )
    p.add_argument(
        "--logit-scale",
        type=_log_scale,
        help=f"log-temperature of the inputs (default the initial value of the loss's model: "
        f"ln(1/0.07) = {LOG_SCALE:.4f} for clip, ln 10 = {SIGLIP_LOG_SCALE:.4f} for siglip)",
    )
    p.add_argument(
        "--logit-bias",
        type=_bias,
        help=f"siglip only: the bias added to every logit (default {SIGLIP_BIAS:g}, SigLIP's "
        "initial value)",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of the inputs (default 0)")


def _target_flags(p: Parser) -> None:
    p.add_argument(
        "--labels",
        type=_labels,
        default=0,
        metavar="K",
        help="same-item labels for every case: pair i's id is i %% K, so each item has about "
        "B/K pairs spread over the batch; K >= 1 (1: one item). The peers take none, nor "
        "does fused yet: left out by default, skip rows when named. Default 0: off, every "
        "pair its own item",
    )
    p.add_argument(
        "--same-label",
        choices=SAME_LABEL,
        help="with --labels: positive, the pairs of one item are each other's targets; "
        "ignore, they leave the loss (the own pair the only target). Default positive",
    )
    p.add_argument(
        "--negatives",
        type=_ratio,
        default=0.0,
        metavar="R",
        help="round(R*B) extra negative text columns for every case (1: as many as pairs), "
        "drawn like the texts from another seed, fp32; the peers take none: left out by "
        "default, skip rows when named. Default 0: none",
    )


def _how_flags(p: Parser) -> None:
    p.add_argument(
        "--repeats", type=_positive_int, help=f"timed runs per case ({_per_device('repeats')})"
    )
    p.add_argument(
        "--warmup",
        type=_nonnegative_int,
        help=f"untimed runs before them ({_per_device('warmup')})",
    )
    p.add_argument(
        "--rounds",
        type=_positive_int,
        default=1,
        help="run the whole sweep this many times, interleaved, and pool each case's timed "
        "runs: on a shared machine, load then hits every case alike (default 1)",
    )
    p.add_argument(
        "--chunk-size",
        type=_positive_int,
        help="columns per chunk for chunked (default: the backend's choice from the sizes)",
    )
    p.add_argument(
        "--isolate",
        choices=["process", "none"],
        help="run each case in a fresh process or in this one (default process on a CPU, "
        "none on CUDA)",
    )
    p.add_argument(
        "--case-timeout",
        type=_seconds,
        default=DEFAULT_CASE_TIMEOUT,
        help=f"seconds per case with --isolate process (default {DEFAULT_CASE_TIMEOUT:g})",
    )
    p.add_argument(
        "--mem-limit-mb",
        type=_positive_int,
        help="CPU workers (--isolate process): cap extra address space so a too-large case "
        "fails as OOM instead of invoking the OOM killer (default no cap)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        help=f"CPU threads per case (default torch's, {torch.get_num_threads()} here)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes and one timed run (the --quick values)"
    )
    p.add_argument(
        "--no-check", action="store_true", help="skip the float64 oracle (empty diff columns)"
    )


def _output_flags(p: Parser) -> None:
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"folder of the CSV/MD/PNG, created if needed (default {DEFAULT_OUT}; the "
        "committed reference results are under benchmarks/results)",
    )
    p.add_argument(
        "--name",
        type=_stem,
        help="file stem of the CSV/PNG/MD (default from the device name, plus -siglip for "
        "--loss siglip)",
    )
    p.add_argument("--no-plot", action="store_true", help="write only the CSV and the table")
    p.add_argument(
        "--plot-only", action="store_true", help="redraw plot and table from the CSV, run nothing"
    )
