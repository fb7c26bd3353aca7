"""``palmtree verify``'s options: what it checks, how they are parsed and checked."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..backends import CONCRETE_BACKENDS
from ..options import LOSSES
from ..precision import PRECISIONS

DEFAULT_SCALES = (1 / 0.07, 99.0)
FAULTS = ("raise", "hang", "wrong", "nan", "labels", "negatives", "d_neg")
#: The rows with global targets (:mod:`.targets`): labels under each ``same_label`` with
#: the extra negatives, and the negatives alone.
TARGETS = ("positive", "ignore", "negatives")
#: The smallest temperature float32 holds as a normal number; below it ``exp(logit_scale)``
#: is 0 or subnormal in float32, and every comparison would only measure that rounding.
MIN_SCALE = 2.0**-126
#: The longest --timeout: a day (a timedelta, gloo and the watchdog all take it).
MAX_TIMEOUT_S = 86400.0

#: What "exact" means here, for ``--help`` and under the table (docs/design.md §8).
EXACT = (
    "Exact means (docs/design.md, section 8): loss values and the temperature's and bias's "
    "gradients within a bound derived from the computation, relative to the value, so "
    "small losses keep their digits; gradient tensors within 2x the error of a plain fp32 "
    "computation with the same operand rounding."
)


@dataclass
class Options:
    nproc: int | None = None  # None: 2 spawned ranks (ignored under torchrun)
    backends: tuple[str, ...] | None = None  # None: those that run here (default_backends)
    precisions: tuple[str, ...] = PRECISIONS
    scales: tuple[float, ...] = DEFAULT_SCALES
    losses: tuple[str, ...] = LOSSES
    targets: tuple[str, ...] = TARGETS
    batch: int = 389
    dim: int = 72
    seed: int = 0
    chunk_size: int | None = None
    timeout: float = 120.0
    json: bool = False
    fault: tuple[str, int] | None = None  # (kind, rank): --inject-fault, for the tests


def parse_args(argv: list[str]) -> Options:
    """Parses ``argv``; raises ``SystemExit`` (0 for ``--help``, 2 on a usage error)."""
    p = argparse.ArgumentParser(
        prog="palmtree verify",
        description=(
            "Check palmtree's distributed CLIP and SigLIP losses and their gradients "
            "against a float64 single-process reference, for every backend and precision "
            "that runs here. Spawns --nproc local gloo ranks, or uses the world torchrun "
            "launched. " + EXACT
        ),
    )
    p.add_argument("--nproc", type=_positive(int), default=None, help="local ranks to spawn (2)")
    p.add_argument(
        "--backends",
        type=_csv("backends", CONCRETE_BACKENDS),
        default=None,
        help="comma-separated (default: reference,chunked and fused where CUDA and Triton are)",
    )
    p.add_argument(
        "--precisions",
        type=_csv("precisions", PRECISIONS),
        default=PRECISIONS,
        help="comma-separated matmul operand precisions (default: ieee,tf32,bf16)",
    )
    p.add_argument(
        "--scales",
        type=_scales,
        default=DEFAULT_SCALES,
        help="comma-separated temperatures exp(logit_scale) (default: 14.29,99)",
    )
    p.add_argument(
        "--losses",
        type=_csv("losses", LOSSES),
        default=LOSSES,
        help="comma-separated: clip (softmax, every scale) and siglip (sigmoid, bias -10 "
        "and +10 at the largest scale) (default: clip,siglip)",
    )
    p.add_argument(
        "--targets",
        type=_targets,
        default=TARGETS,
        help="comma-separated rows with global targets, at the largest scale (SigLIP: bias "
        "-10): positive and ignore (labels i %% 3 under that same_label, and extra "
        "negatives), negatives (alone; the only one fused takes), or none "
        "(default: positive,ignore,negatives)",
    )
    p.add_argument("--batch", type=_positive(int), default=389, help="global batch (389)")
    p.add_argument("--dim", type=_positive(int), default=72, help="feature dim (72)")
    p.add_argument("--seed", type=_seed, default=0, help="data seed (0)")
    p.add_argument("--chunk-size", type=_positive(int), default=None, help="chunked backend")
    p.add_argument(
        "--timeout",
        type=_timeout,
        default=120.0,
        help="seconds before a stuck run is ended, naming the ranks that did not finish (120)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object, not a table")
    # For the tests of this command: make one rank raise, hang, return a wrong or a NaN
    # gradient, pass labels of its own, drop its negatives or return their gradient wrong.
    p.add_argument(
        "--inject-fault", dest="fault", type=_fault, default=None, help=argparse.SUPPRESS
    )
    return Options(**vars(p.parse_args(argv)))


def default_backends(device) -> tuple[str, ...]:
    """``reference`` and ``chunked``, and ``fused`` on CUDA where Triton is installed."""
    from ..backends import fused_can_run

    extra = ("fused",) if device.type == "cuda" and fused_can_run(device) else ()
    return ("reference", "chunked", *extra)


def backend_problem(backends, device) -> str | None:
    """Why the requested backends cannot all run on ``device`` (``None`` if they can)."""
    from ..backends import fused_can_run, triton_available

    if backends and "fused" in backends and not fused_can_run(device):
        why = "Triton is not installed" if not triton_available() else f"the ranks run on {device}"
        return (
            f"backend 'fused' cannot run here ({why}); it needs CUDA and Triton, e.g. under "
            "torchrun on GPUs (or TRITON_INTERPRET=1 for a slow CPU check)"
        )
    return None


# --------------------------------------------------------------------------- argument types


def _csv(kind: str, allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{kind} must be a comma-separated subset of {','.join(allowed)}, got {text!r}"
            )
        return items

    return parse


def _targets(text: str) -> tuple[str, ...]:
    if text.strip() == "none":
        return ()
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if not items or any(x not in TARGETS for x in items):
        raise argparse.ArgumentTypeError(
            f"targets must be none or a comma-separated subset of {','.join(TARGETS)}, got {text!r}"
        )
    return items


def _scales(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or any(not (MIN_SCALE <= v <= 100) for v in values):  # refuses nan too
        raise argparse.ArgumentTypeError(
            f"scales must be numbers in [{MIN_SCALE:.2g}, 100] (a smaller temperature is 0 "
            f"in float32), got {text!r}"
        )
    return values


def _fault(text: str) -> tuple[str, int]:
    kind, _, rank = text.partition(":")
    if kind not in FAULTS or not rank.isdigit():
        raise argparse.ArgumentTypeError(f"expected one of {FAULTS}:RANK, got {text!r}")
    return kind, int(rank)


def _positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:  # within what torch.Generator.manual_seed accepts
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {text}")
    return value


def _timeout(text: str) -> float:
    value = float(text)
    if not 0 < value <= MAX_TIMEOUT_S:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {text}"
        )
    return value
