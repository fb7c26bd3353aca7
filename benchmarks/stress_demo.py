"""Runs the 2-rank demo (``palmtree train``) many times in a row under CPU load.

    .venv/bin/python benchmarks/stress_demo.py                    # 30 demo runs, 1 busy process
    .venv/bin/python benchmarks/stress_demo.py --runs 5 --load 2 -- --epochs 2 --max-steps 5

Not part of CI: 30 runs take 30 times the demo (10 to 25 minutes on 2 cores). It guards
against failures that only show up now and then, such as a rank dying while it tears
down after training. ``--load N`` keeps N busy-loop processes running meanwhile, so the
ranks get descheduled at unlucky moments as on a shared machine. Flags after ``--`` go
to ``palmtree train``.

A run fails when its exit status is not 0, when ``results.json`` is missing or not
``"completed"`` (unless ``--max-steps`` is among the flags), or when it runs past
``--run-timeout``. One line per run, then a summary; the exit status is 1 when any run
failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=30, help="demo runs in a row (30)")
    p.add_argument("--load", type=int, default=1, help="busy-loop processes meanwhile (1)")
    p.add_argument("--run-timeout", type=float, default=600, help="seconds per run (600)")
    p.add_argument("--logs", default=None, help="run folders go here (default: a temp dir)")
    p.add_argument("train_args", nargs="*", help="flags for palmtree train, after --")
    return p.parse_args(argv)


def start_load(n: int) -> list[subprocess.Popen]:
    """``n`` processes that spin on a core each until :func:`stop_load`."""
    return [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
        for _ in range(n)
    ]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def run_once(i: int, logs: Path, args) -> tuple[bool, float, str]:
    """One demo run: ``(ok, seconds, what went wrong)``."""
    name = f"stress{i:03d}"
    cmd = [sys.executable, "-m", "palmtree", "train", "--logs", str(logs), "--name", name]
    cmd += ["--no-progress", *args.train_args]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.run_timeout)
    except subprocess.TimeoutExpired:
        return False, time.monotonic() - start, f"did not finish in {args.run_timeout:g} s"
    seconds = time.monotonic() - start
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    if proc.returncode != 0:
        return False, seconds, f"exit status {proc.returncode}: {tail}"
    results = logs / name / "results.json"
    if not results.is_file():
        return False, seconds, "exit status 0 but no results.json"
    stopped_early = "--max-steps" in args.train_args
    if not stopped_early and not json.loads(results.read_text())["completed"]:
        return False, seconds, "results.json says the run did not complete"
    return True, seconds, ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="palmtree-stress-") as tmp:
        logs = Path(args.logs or tmp)
        load = start_load(args.load)
        failures, times = [], []
        start = time.monotonic()
        try:
            for i in range(args.runs):
                ok, seconds, why = run_once(i, logs, args)
                times.append(seconds)
                print(f"run {i + 1:3d}/{args.runs}: {'ok  ' if ok else 'FAIL'} {seconds:6.1f} s"
                      + (f"  {why}" if why else ""), flush=True)  # fmt: skip
                if not ok:
                    failures.append((i + 1, why))
        finally:
            stop_load(load)
        total = time.monotonic() - start
    print(
        f"stress_demo: {len(times)} runs, {len(failures)} failed, {total:.0f} s in all "
        f"({total / 60:.1f} min; runs {min(times):.1f} to {max(times):.1f} s), "
        f"load: {args.load} busy process(es) on {cores} core(s), "
        f"palmtree train {' '.join(args.train_args) or '(defaults)'}"
    )
    for run, why in failures:
        print(f"  run {run}: {why}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
