"""``palmtree bench``'s command line: the options, their defaults per device, the run.

``main(argv)`` resolves the options into a :class:`~palmtree.bench.sweep.Sweep`, runs
it, appends one CSV row per case and redraws the table and the plot. ``--case JSON``
(hidden) is the worker that :func:`~palmtree.bench.measure.run_case_in_process` starts.

Results go to ``runs/bench/`` unless ``--out`` says otherwise: the reference results
committed under ``benchmarks/results/`` are rewritten only on purpose
(``--out benchmarks/results``), never by a plain ``palmtree bench`` or ``make bench``.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

import palmtree

from ..backends import BACKENDS, fused_can_run
from ..backends.base import PRECISIONS
from . import peers
from .cases import DEFAULTS, LOG_SCALE, LOSSES, QUICK, SIGLIP_BIAS, SIGLIP_LOG_SCALE, impl_label
from .check import bound_precision
from .measure import worker
from .report import append_row, write_report
from .sweep import Sweep, run_sweep

#: Where results go unless ``--out`` says otherwise (ignored by git).
DEFAULT_OUT = Path("runs/bench")
#: The log-temperature of the inputs per loss: each loss's model's initial value.
LOG_SCALES = {"clip": LOG_SCALE, "siglip": SIGLIP_LOG_SCALE}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="palmtree bench",
        description="Forward+backward time and peak memory of the CLIP (or SigLIP) loss per "
        "backend, precision and peer; appends CSV rows and redraws a log-log plot.",
    )
    p.add_argument(
        "--loss",
        choices=LOSSES,
        default="clip",
        help="clip: the softmax loss (clip_loss; peers open_clip's ClipLoss, Inf-CL); "
        "siglip: the sigmoid loss (siglip_loss; peer open_clip's SigLipLoss). Default clip",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--batch-sizes", type=int, nargs="+", metavar="B", help="global batch sizes")
    p.add_argument("--dims", type=int, nargs="+", metavar="D", default=None, help="default: 512")
    p.add_argument(
        "--backends",
        nargs="*",
        choices=[b for b in BACKENDS if b != "auto"],
        help="default: reference chunked (+ fused on CUDA)",
    )
    p.add_argument(
        "--precisions", nargs="+", choices=PRECISIONS, help="default: ieee (CPU), all (CUDA)"
    )
    p.add_argument(
        "--peers",
        nargs="*",
        choices=peers.PEERS,
        help="peer implementations (default: those that can run here; '--peers' alone: none)",
    )
    p.add_argument("--repeats", type=int, help="timed runs per case (median reported)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole sweep this many times, interleaved, and pool each case's timed "
        "runs: on a shared machine, load then hits every case alike",
    )
    p.add_argument("--warmup", type=int, help="untimed runs before them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--logit-scale",
        type=float,
        help="log-temperature of the inputs (default: the initial value of the loss's "
        "model, ln(1/0.07) for clip, ln(10) for siglip)",
    )
    p.add_argument(
        "--logit-bias",
        type=float,
        default=SIGLIP_BIAS,
        help="siglip: the bias added to every logit (default -10, SigLIP's initial value)",
    )
    p.add_argument("--chunk-size", type=int, help="columns per chunk for 'chunked' (default auto)")
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"folder of the CSV/MD/PNG (default {DEFAULT_OUT}; the committed reference "
        "results are under benchmarks/results)",
    )
    p.add_argument(
        "--name",
        help="file stem of the CSV/PNG/MD (default: from the device name, plus -siglip "
        "for --loss siglip)",
    )
    p.add_argument("--no-plot", action="store_true", help="write only the CSV and the table")
    p.add_argument(
        "--no-check", action="store_true", help="skip the float64 oracle (empty diff columns)"
    )
    p.add_argument(
        "--isolate",
        choices=["process", "none"],
        help="run each case in a fresh process (default on CPU) or in this one (default on CUDA)",
    )
    p.add_argument("--case-timeout", type=float, default=1800, help="seconds per case (process)")
    p.add_argument(
        "--mem-limit-mb",
        type=int,
        help="CPU workers: cap extra address space so a too-large case fails as OOM "
        "instead of invoking the OOM killer",
    )
    p.add_argument("--threads", type=int, help="CPU threads per case (default: torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (for tests)")
    p.add_argument(
        "--plot-only", action="store_true", help="redraw plot and table from the CSV, run nothing"
    )
    p.add_argument("--case", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """``palmtree bench [options]``; returns the exit status (2: unusable options)."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.case:
        return worker(args.case)

    kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        print("palmtree bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(kind)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.name or default_name(device, args.loss)
    csv_path = args.out / f"{name}.csv"
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        print(
            "palmtree bench: error: the plot needs matplotlib, the project's [bench] extra: "
            "pip install '.[bench]' (in the project's folder), or pass --no-plot",
            file=sys.stderr,
        )
        return 2
    if args.plot_only:
        write_report(csv_path, args.no_plot)
        return 0
    sweep = _sweep(args, device)
    if sweep.repeats < 1 or sweep.warmup < 0 or sweep.rounds < 1:
        print("palmtree bench: --repeats and --rounds must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    common = dict(
        timestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        device=device_name(device),
        torch_version=torch.__version__,
        palmtree_version=palmtree.__version__,
    )
    where = f"{common['device']}, torch {torch.__version__}, isolate={sweep.isolate}"
    where += f", loss {sweep.loss}"
    print(f"palmtree bench on {where}")
    versions = {impl: _impl_version(impl) for impl in sweep.impls}
    for (dim, batch, impl, precision), result in run_sweep(sweep).items():
        label = impl_label(impl, sweep.loss)
        row = dict(common, impl=label, impl_version=versions[impl], precision=precision)
        append_row(csv_path, dict(row, batch=batch, dim=dim, **result))
    write_report(csv_path, args.no_plot)
    return 0


def _sweep(args: argparse.Namespace, device: torch.device) -> Sweep:
    """The options, with the device's defaults (``--quick``: tiny ones) for those not given."""
    defaults = dict(DEFAULTS[device.type], dims=[512])
    if args.quick:
        defaults.update(QUICK)
    backends = args.backends
    if backends is None:
        backends = ["reference", "chunked"] + (["fused"] if fused_can_run(device) else [])
    impl_peers = args.peers
    if impl_peers is None:
        impl_peers = [p for p in peers.PEERS if peers.peer_status(p, device, args.loss) is None]
    precisions = args.precisions or defaults["precisions"]
    return Sweep(
        device=device,
        batch_sizes=args.batch_sizes or defaults["batch_sizes"],
        dims=args.dims or defaults["dims"],
        impls=[*backends, *impl_peers],
        precisions=precisions,
        repeats=args.repeats if args.repeats is not None else defaults["repeats"],
        warmup=args.warmup if args.warmup is not None else defaults["warmup"],
        rounds=args.rounds,
        seed=args.seed,
        log_scale=args.logit_scale if args.logit_scale is not None else LOG_SCALES[args.loss],
        isolate=args.isolate or ("process" if device.type == "cpu" else "none"),
        check_precision=None if args.no_check else bound_precision(precisions),
        chunk_size=args.chunk_size,
        mem_limit_mb=args.mem_limit_mb,
        threads=args.threads,
        case_timeout=args.case_timeout,
        loss=args.loss,
        logit_bias=args.logit_bias,
    )


def default_name(device: torch.device, loss: str = "clip") -> str:
    """The default file stem: the device's slug (``cpu-amd-epyc``), ``-siglip`` appended
    for the sigmoid loss, so that each file's table and plot hold one loss."""
    name = _slug(f"{device.type} {device_name(device).split('(')[0]}")
    return name if loss == "clip" else f"{name}-{loss}"


def _impl_version(impl: str) -> str:
    if impl in BACKENDS:
        return "palmtree " + palmtree.__version__
    return f"{impl} {peers.peer_version(impl) or '?'}"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "CPU"
    return f"{model} ({torch.get_num_threads()} threads)"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
