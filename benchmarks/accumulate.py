"""Peak memory and time per training step of the demo towers against the global batch,
with and without ``palmtree.accumulate``.

    python benchmarks/accumulate.py                       # the default sweep (CPU)
    python benchmarks/accumulate.py --quick --out DIR     # tiny sizes, seconds

The model is the one ``palmtree train`` builds for the digits (``palmtree.train.models``
with its defaults: a CNN on 8x8 images, a 2-layer Transformer on word tokens,
``ClipLoss`` with its projections, the ``chunked`` backend), on random inputs of the
digits' shapes: 8x8 images and captions of 1 to 9 words. One training step is
``zero_grad``, the gradients, and one AdamW step:

* ``plain``: one forward and backward of the whole global batch;
* ``accumulate``: ``palmtree.accumulate`` over micro-batches of ``--micro-batch`` pairs
  (encode all without a graph, the loss once on the cached features, re-encode each with
  a graph and backpropagate its slice of the features' gradients).

Each (mode, global batch) runs in a fresh process, as ``palmtree bench`` runs its cases:
one small step first (thread pools, lazy state), then the address space is capped at
its current size plus ``--mem-limit-mb`` (``palmtree.bench.measure.limit_address_space``,
so that a step too large fails as ``oom`` instead of waking the kernel's OOM killer),
the peak RSS is reset, and ``--warmup`` untimed and ``--steps`` timed steps run. Peak
memory is the growth of the peak RSS over the model, the optimiser and the global
batch's inputs (``palmtree.bench.measure.PeakMemory``); time is the median step.

Writes ``<out>/<name>.csv`` (one row per mode and global batch), ``<name>.md`` (the
table) and ``<name>.png`` (memory and time against the global batch). Nothing here is
imported by the library.

This file is the command line and the sweep; the rooms it runs are the package
``accumulation/`` beside it (``workload``: the model, the inputs and one case;
``report``: the files).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

import palmtree
from palmtree.bench.cli import device_name
from palmtree.bench.measure import RESULT_MARK, one_line, run_worker
from palmtree.train.models import ModelConfig

# A test loads this file by its path, so the folder that holds accumulation/ need not be
# on sys.path yet (running the script puts it there).
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from accumulation.report import FIELDS, print_row, write_report  # noqa: E402
from accumulation.workload import MODES, Case, make_batch, micro_batches, run_case  # noqa: E402

#: What the tests and a reader of this file use, besides :func:`main`.
__all__ = ["FIELDS", "MODES", "QUICK", "ModelConfig", "main", "make_batch", "micro_batches"]

#: The default sweep: plain training of the demo towers needs about 0.15 MB per pair, so
#: under a 2 GB cap it fits up to B = 8192 and fails at 16384. B = 512, one micro-batch,
#: gives the activations of one micro-batch (plain) to compare accumulation's peak with.
DEFAULTS = dict(
    global_batches=[512, 1024, 2048, 4096, 8192, 16384, 32768],
    micro_batch=512,
    mem_limit_mb=2048,
    steps=3,
    warmup=1,
)
QUICK = dict(global_batches=[16, 32], micro_batch=8, mem_limit_mb=None, steps=1, warmup=0)


def run_in_process(case: Case, timeout: float) -> dict:
    """``run_case`` in a fresh Python process, so that the peak RSS is the case's own."""
    return run_worker([sys.executable, __file__, "--case", json.dumps(asdict(case))], timeout)


def worker(case_json: str) -> int:
    """``accumulate.py --case JSON``: one case, its result on one stdout line."""
    try:
        result = run_case(Case(**json.loads(case_json)))
    except Exception as exc:
        result = dict(status="error", note=one_line(exc))
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


def sweep(args) -> list[dict]:
    """Every mode at every global batch, ascending; a mode that ran out of memory at some
    batch is not run at larger ones (an ``oom`` row says so)."""
    rows, failed = [], {}
    common = dict(
        timestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        device=device_name(torch.device("cpu")),
        torch_version=torch.__version__,
        palmtree_version=palmtree.__version__,
        mem_limit_mb=args.mem_limit_mb or "",
    )
    for big in sorted(args.global_batches):
        for mode in MODES:
            micro = args.micro_batch if mode == "accumulate" else big
            case = Case(
                mode=mode,
                global_batch=big,
                micro_batch=micro,
                steps=args.steps,
                warmup=args.warmup,
                seed=args.seed,
                mem_limit_mb=args.mem_limit_mb,
                threads=args.threads,
            )
            if mode in failed:
                result = dict(status="oom", note=f"not run: out of memory at B={failed[mode]}")
            else:
                result = run_in_process(case, args.case_timeout)
            if result["status"] == "oom":
                failed.setdefault(mode, big)
            rows.append(dict(common, mode=mode, global_batch=big, micro_batch=micro, **result))
            print_row(rows[-1])
    return rows


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--global-batches", type=int, nargs="+", metavar="B")
    p.add_argument("--micro-batch", type=int, help="pairs per micro-batch of accumulate")
    p.add_argument(
        "--mem-limit-mb",
        type=int,
        help="cap on each case's extra address space (default 2048; 0: none)",
    )
    p.add_argument("--steps", type=int, help="timed steps per case (median reported)")
    p.add_argument("--warmup", type=int, help="untimed steps before them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's default)")
    p.add_argument("--case-timeout", type=float, default=1800, help="seconds per case")
    p.add_argument("--out", type=Path, default=Path("runs/accumulate"))
    p.add_argument("--name", help="file stem (default: accumulate-<device>)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one step (for tests)")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = dict(DEFAULTS, **(QUICK if args.quick else {}))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.mem_limit_mb = args.mem_limit_mb or None
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the sweep and writes its files; ``--case JSON`` runs one case (the worker)."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.case:
        return worker(args.case)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.name or "accumulate-" + _slug(device_name(torch.device("cpu")).split("(")[0])
    before = _load()
    print(f"demo towers on {device_name(torch.device('cpu'))}, load {before}")
    rows = sweep(args)
    load = f"{before} before, {_load()} after"
    files = write_report(rows, args.out, name, args, load)
    print(f"\nload {load}; wrote {', '.join(map(str, files))}")
    return 0


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", ("cpu " + text).lower()).strip("-")


if __name__ == "__main__":
    sys.exit(main())
