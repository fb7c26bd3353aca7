"""Compile audit: the fused backend's Triton kernels, compiled for named GPUs without one.

For every feature width ``D`` in :data:`DIMS`, every precision and every target in
:data:`TARGETS` (sm_90: H100/H200, sm_80: A100), the kernels are compiled exactly as the
fused backend launches them on that card, and ``cuobjdump`` (shipped in Triton's wheel)
reports their registers and per-thread local memory; Triton's metadata gives the shared
memory its launcher requests.

Which kernels, signatures and launch options? None are listed here. The script runs
:func:`palmtree.clip_loss` and :func:`palmtree.siglip_loss` with ``backend="fused"`` and
their backwards on CPU tensors of ``RECORD_ROWS`` pairs, once per ``bwd_mode``, with
``TilePlan.for_problem`` answering what :meth:`TilePlan.for_target` plans for the
target, and records every kernel launch
instead of running it. Each distinct launch becomes a compile request: tensors give
pointer types, integers ``i32``/``i64``, pointers aligned to 16 bytes and integers
divisible by 16 get Triton's divisibility hint (as a launch on the card specialises
them); constexprs and ``num_warps``/``num_stages`` are the launch's own. A kernel that
is added or changed is audited as it is launched, without touching this file.

A row passes :func:`problems_of` when it compiles, uses no local memory where the plan
promises no register spills (sm_90 up to ``D = 1024``; see :class:`Target`) and its
static plus dynamic shared memory fits the card's per-block limit. Spills listed in
:data:`KNOWN_SPILLS` are open findings: reported, not failed, until they are fixed (and
then an entry that no longer spills fails until it is removed). Triton's on-disk cache
(``~/.triton/cache``, keyed by the kernel's source, the target and the options) makes
reruns take seconds; a changed kernel is a new key, so the cache cannot hide a change.

Usage::

    python benchmarks/compile_audit.py                          # tables; exit 1 on a new problem
    python benchmarks/compile_audit.py --write-docs docs/kernels.md   # (make audit)
    python benchmarks/compile_audit.py --json - --calibrate     # rows as JSON (the test)
    python benchmarks/compile_audit.py --print-known            # findings as KNOWN_SPILLS

Needs Triton with its NVIDIA backend, not CUDA. Refuses to run under
``TRITON_INTERPRET=1`` (the interpreter compiles nothing).

This file is the command line; the audit's rooms are the package ``audit/`` beside it
(``targets``, ``toolchain``, ``record``, ``compiling``, ``report``), and the names below
are theirs, handed on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# A test loads this file by its path, so the folder that holds audit/ need not be on
# sys.path yet (running the script puts it there).
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from audit.compiling import audit, calibrate, known_key, problems_of, vanished  # noqa: E402
from audit.record import kernels_defined, record_launches  # noqa: E402
from audit.report import DOC_BEGIN, DOC_END, findings, report, write_docs  # noqa: E402
from audit.targets import CALIBRATION, DIMS, KNOWN_SPILLS, TARGETS  # noqa: E402
from audit.toolchain import Unavailable, nvidia_tool, triton_api  # noqa: E402

#: What the tests and a reader of this file use, besides :func:`main`.
__all__ = [
    "CALIBRATION",
    "DIMS",
    "DOC_BEGIN",
    "DOC_END",
    "KNOWN_SPILLS",
    "TARGETS",
    "audit",
    "calibrate",
    "main",
    "problems_of",
    "record_launches",
]


def _dump(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=1, default=str)
    if str(path) == "-":
        print(text)
    else:
        path.write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    p.add_argument("--precisions", nargs="+", help="default: every precision")
    p.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--json", type=Path, help="write the rows as JSON here ('-': stdout only)")
    p.add_argument("--write-docs", type=Path, help="replace the generated section of this file")
    p.add_argument("--calibrate", action="store_true", help="also audit CALIBRATION (JSON)")
    p.add_argument("--print-known", action="store_true", help="print spills as KNOWN_SPILLS")
    args = p.parse_args(argv)
    to_stdout = str(args.json) == "-"
    try:
        triton_api()
        nvidia_tool("cuobjdump")
    except Unavailable as exc:
        if args.json:
            _dump(args.json, dict(unavailable=str(exc)))
        print(f"compile audit unavailable: {exc}", file=sys.stderr)
        return 0 if args.json else 2
    started = time.perf_counter()
    rows = audit(args.dims, args.precisions, args.targets, args.jobs)
    calibration = calibrate(args.jobs) if args.calibrate else []
    elapsed = time.perf_counter() - started
    if args.json:
        import triton

        data = dict(triton=triton.__version__, kernels_defined=kernels_defined(), rows=rows)
        data.update(calibration=calibration, vanished=vanished(rows), seconds=elapsed)
        _dump(args.json, data)
    text = report(rows)
    if args.write_docs:
        write_docs(args.write_docs, text)
    if args.print_known:
        spills = sorted({known_key(r) for r in rows if any("spills" in p for p in r["problems"])})
        print("KNOWN_SPILLS = frozenset({\n" + "".join(f"    {k!r},\n" for k in spills) + "})")
    elif not to_stdout:
        print(text)
    new, _, _ = findings(rows)
    print(
        f"{len(rows)} launches audited in {elapsed:.1f} s; {len(new)} new problems", file=sys.stderr
    )
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main())
