"""``palmtree bench``'s command line: the options checked, the run, its rows kept.

:func:`parse` checks every value before any work (one line, exit status 2: see
:mod:`~palmtree.bench.options`) and resolves them, with the device's defaults, into a
:class:`~palmtree.bench.sweep.Sweep`. :func:`main` runs it, appends each case's CSV row as
soon as the case ends, and then redraws the table and the plot; if that fails, or the run
is interrupted, the rows measured are already in the CSV. ``--case JSON`` (hidden) is
the worker that :func:`~palmtree.bench.measure.run_case_in_process` starts.

Results go to ``runs/bench/`` unless ``--out`` says otherwise: the reference results
committed under ``benchmarks/results/`` are rewritten only on purpose
(``--out benchmarks/results``), never by a plain ``palmtree bench`` or ``make bench``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import __version__
from ..backends import BACKENDS, fused_can_run, triton_available
from . import peers
from .cases import DEFAULTS, QUICK, SIGLIP_BIAS, impl_label
from .check import bound_precision
from .compiled import COMPILED
from .csvfile import append_row, default_name, device_name, output_problem
from .measure import one_line, worker
from .options import LOG_SCALES, build_parser
from .report import write_report
from .sweep import Sweep, run_sweep
from .targets import TargetSpec, skip_reason

#: The flags that name lists, which must not name a value twice.
_LISTS = ("batch_sizes", "dims", "backends", "precisions", "peers")


@dataclass(frozen=True)
class Run:
    """What one ``palmtree bench`` command does, resolved by :func:`parse`."""

    csv_path: Path
    no_plot: bool
    sweep: Sweep | None  # None: --plot-only
    case: str | None = None  # the worker's case (JSON); nothing else is then resolved


def parse(argv: list[str]) -> Run:
    """``argv`` checked and resolved; a bad value raises ``SystemExit(2)`` after one line
    on stderr, before any work (``--help``: ``SystemExit(0)``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.case:
        return Run(Path(), True, None, case=args.case)
    kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(kind)
    problem = _problem(args, device)
    sweep = None if problem or args.plot_only else _sweep(args, device)
    if sweep is not None and not sweep.impls:
        problem = "nothing to measure: no backend named and no peer can run here"
    if problem:
        parser.error(problem)
    name = args.name or default_name(device, args.loss)
    problem = output_problem(args.out, name, args.plot_only)  # last: it creates the folder
    if problem:
        parser.error(problem)
    return Run(args.out / f"{name}.csv", args.no_plot, sweep)


def _problem(args: argparse.Namespace, device: torch.device) -> str | None:
    """What is wrong with a combination of flags, or ``None``."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return "--device cuda but CUDA is not available"
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        return (
            "the plot needs matplotlib, the project's [bench] extra: pip install '.[bench]' "
            "(in the project's folder), or pass --no-plot"
        )
    if args.plot_only:
        return None
    for key in _LISTS:
        values = getattr(args, key) or []
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            return f"--{key.replace('_', '-')} names {', '.join(twice)} more than once"
    if args.backends == [] and args.peers == []:
        return "nothing to measure: --backends and --peers name no implementation"
    if args.logit_bias is not None and args.loss != "siglip":
        return "--logit-bias is the sigmoid loss's bias: it needs --loss siglip"
    if args.same_label is not None and not args.labels:
        return "--same-label says how pairs of one item count: it needs --labels K"
    if args.mem_limit_mb is not None and device.type != "cpu":
        return "--mem-limit-mb caps CPU worker processes: it needs --device cpu"
    if args.mem_limit_mb is not None and args.isolate == "none":
        # The cap would then stay on this process, its report and plot included.
        return "--mem-limit-mb caps worker processes: it needs --isolate process"
    return None


def main(argv: list[str] | None = None) -> int:
    """``palmtree bench [options]``; returns the exit status: 0, 1 when the table or the
    plot could not be written (the CSV has the rows), 130 when interrupted (the rows
    measured are in the CSV). Bad options exit 2 from :func:`parse`."""
    run = parse(list(sys.argv[1:] if argv is None else argv))
    if run.case:
        return worker(run.case)
    if run.sweep is not None:
        written: list[tuple] = []
        try:
            _measure(run.sweep, run.csv_path, written)
        except KeyboardInterrupt:
            kept = f"rows written to {run.csv_path}: {len(written)}"
            print(f"\npalmtree bench: interrupted: {kept}", file=sys.stderr)
            return 130
    try:
        write_report(run.csv_path, run.no_plot)
    except Exception as exc:  # the rows are safe in the CSV: say so, and how to redraw
        why = one_line(exc)
        print(
            f"palmtree bench: error: the table or plot could not be written ({why}); "
            f"the rows are in {run.csv_path}: redraw with --plot-only",
            file=sys.stderr,
        )
        return 1
    return 0


def _measure(sweep: Sweep, csv_path: Path, written: list[tuple]) -> None:
    """Runs the sweep, appending each case's row to ``csv_path`` as soon as it is known
    (and its key to ``written``)."""
    if sweep.threads:
        torch.set_num_threads(sweep.threads)
    common = dict(
        timestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        device=device_name(sweep.device),
        torch_version=torch.__version__,
        palmtree_version=__version__,
    )
    where = f"{common['device']}, torch {torch.__version__}, isolate={sweep.isolate}"
    targets = sweep.targets.describe()
    print(f"palmtree bench on {where}, loss {sweep.loss}" + (f", {targets}" if targets else ""))
    versions = {impl: _impl_version(impl) for impl in sweep.impls}
    for (dim, batch, impl, precision), result in run_sweep(sweep):
        label = impl_label(impl, sweep.loss, sweep.targets)
        row = dict(common, impl=label, impl_version=versions[impl], precision=precision)
        append_row(csv_path, dict(row, batch=batch, dim=dim, **result))
        written.append((dim, batch, impl, precision))


def _sweep(args: argparse.Namespace, device: torch.device) -> Sweep:
    """The options, with the device's defaults (``--quick``: tiny ones) for those not given."""
    defaults = dict(DEFAULTS[device.type])
    if args.quick:
        defaults.update(QUICK)
    targets = TargetSpec(args.labels, args.same_label or "positive", args.negatives)
    precisions = args.precisions or defaults["precisions"]
    return Sweep(
        device=device,
        batch_sizes=args.batch_sizes or defaults["batch_sizes"],
        dims=args.dims or defaults["dims"],
        impls=_impls(args, device, targets),
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
        logit_bias=SIGLIP_BIAS if args.logit_bias is None else args.logit_bias,
        targets=targets,
    )


def _impls(args: argparse.Namespace, device: torch.device, targets: TargetSpec) -> list[str]:
    """The implementations named, or by default those that can run here with ``targets``
    (a named one that cannot is a skip row with the reason)."""
    backends = args.backends
    if backends is None:
        backends = ["reference", "chunked"]
        backends += [COMPILED] if device.type == "cuda" and triton_available() else []
        backends += ["fused"] if fused_can_run(device) else []
        backends = [b for b in backends if skip_reason(b, targets) is None]
    impl_peers = args.peers
    if impl_peers is None:
        impl_peers = [
            p
            for p in peers.PEERS
            if peers.peer_status(p, device, args.loss) is None and skip_reason(p, targets) is None
        ]
    return [*backends, *impl_peers]


def _impl_version(impl: str) -> str:
    if impl in (*BACKENDS, COMPILED):
        return "palmtree " + __version__
    return f"{impl} {peers.peer_version(impl) or '?'}"
