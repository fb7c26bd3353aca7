"""Spawned ranks (``palmtree verify --nproc N``): gloo on loopback, and a parent that
never waits past the timeout.

The parent collects each rank's progress and result from a queue. A rank that raises
is named with its traceback (the others get a moment to report); at the timeout the
ranks that did not finish are named with the step each was at and, on POSIX, the
innermost frame of its checks (a faulthandler dump asked for with SIGUSR1). Ranks that
reported must then exit 0 by themselves: a crash while tearing down is a failure too.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import queue as queue_lib
import re
import signal
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta

from ..distributed import free_port
from ..launch_utils import init_process_group, shutdown_process_group
from .options import Options

#: How long the other ranks get to report once one rank has failed.
GRACE_S = 5.0
#: How long ranks that reported get to tear their process group down and exit.
TEARDOWN_S = 60.0


@dataclass
class Outcome:
    """Rank 0's rows (as dicts), or what went wrong."""

    rows: list[dict] | None = None
    error: str | None = None


def spawn_and_check(opts: Options) -> Outcome:
    """Runs the checks on ``opts.nproc`` spawned gloo ranks; never waits past the timeout."""
    import torch.multiprocessing as mp

    n = opts.nproc
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="palmtree-verify-") as tmp:
        stack_files = None
        if hasattr(signal, "SIGUSR1"):
            stack_files = [os.path.join(tmp, f"rank{r}.stack") for r in range(n)]
        procs = [
            ctx.Process(
                target=_spawned_rank,
                args=(r, n, port, opts, results, stack_files and stack_files[r]),
                daemon=True,
            )
            for r in range(n)
        ]
        for p in procs:
            p.start()
        try:
            outcome = _collect(opts, procs, results, stack_files)
            if outcome.error is None:
                outcome.error = _teardown_problem(procs)
            return outcome
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=5)


def _spawned_rank(rank: int, n: int, port: int, opts: Options, results, stack_file) -> None:
    """Entry point of a spawned rank: gloo on loopback, results and progress to the parent."""
    try:
        import torch

        from .checks import run_checks

        if stack_file is not None:  # the parent asks for our stack if we get stuck
            faulthandler.register(signal.SIGUSR1, file=open(stack_file, "w"), all_threads=True)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
        results.put(("progress", rank, "joining the process group"))
        init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=n,
            timeout=timedelta(seconds=opts.timeout),
        )

        def progress(step):
            results.put(("progress", rank, step))

        rows = run_checks(rank, n, torch.device("cpu"), opts, progress)
        # After "done" the parent waits for this process to exit 0 (_teardown_problem).
        results.put(("done", rank, [asdict(r) for r in rows] if rank == 0 else None))
        shutdown_process_group()
    except BaseException as exc:  # report it; the parent decides what the others do
        results.put(("error", rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        results.close()
        results.join_thread()
        os._exit(1)


def _collect(opts: Options, procs, results, stack_files) -> Outcome:
    """Reads the ranks' messages until all reported, one failed, or the time is up."""
    n = len(procs)
    deadline = time.monotonic() + opts.timeout
    last_step = {r: "starting (importing torch)" for r in range(n)}
    done: dict[int, object] = {}
    errors: dict[int, str] = {}

    def handle(message):
        kind, rank, payload = message
        if kind == "progress":
            last_step[rank] = payload
        elif kind == "done":
            done[rank] = payload
        else:
            errors.setdefault(rank, payload)

    while len(done) + len(errors) < n:
        now = time.monotonic()
        if now >= deadline:
            break
        try:
            handle(results.get(timeout=min(0.2, deadline - now)))
            continue
        except queue_lib.Empty:
            pass
        for r, p in enumerate(procs):
            if r in done or r in errors or p.is_alive():
                continue
            # It may have reported just before exiting: drain before judging.
            with contextlib.suppress(queue_lib.Empty):
                while True:
                    handle(results.get(timeout=0.5))
            if r not in done and r not in errors:
                errors[r] = f"the process exited with code {p.exitcode} without reporting"
        if errors:  # the rest get a moment to report; they may be waiting on the failed one
            deadline = min(deadline, time.monotonic() + GRACE_S)

    if errors:
        return Outcome(error=_failure(errors, [r for r in range(n) if r not in done]))
    if len(done) < n:
        stuck = [r for r in range(n) if r not in done]
        frames = _where_stuck(procs, stack_files, stuck)
        lines = [f"timed out after {opts.timeout:g} s: rank(s) {_ranks(stuck)} did not finish"]
        lines += [f"  rank {r} [{last_step[r]}] {frames.get(r, '')}".rstrip() for r in stuck]
        return Outcome(error="\n".join(lines))
    return Outcome(rows=done[0])


def _failure(errors: dict[int, str], unfinished: list[int]) -> str:
    """The first failed rank with its traceback, the others' first lines, the stopped."""
    first = next(iter(errors))  # the first to report; the others often follow from it
    lines = [f"rank {first} failed: {errors[first].rstrip()}"]
    lines += [
        f"rank {r} failed too: {errors[r].splitlines()[0]}" for r in sorted(errors) if r != first
    ]
    stopped = [r for r in unfinished if r not in errors]
    if stopped:
        lines.append(f"rank(s) {_ranks(stopped)} stopped (waiting on the failed rank?)")
    return "\n".join(lines)


def _teardown_problem(procs) -> str | None:
    """Waits for ranks that reported to exit by themselves; says which did not exit 0.

    A rank that crashes while tearing down its process group after reporting has still
    failed: users would see it on their cluster, so the verifier reports it too.
    """
    deadline = time.monotonic() + TEARDOWN_S
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    bad = []
    for r, p in enumerate(procs):
        if p.exitcode is None:
            bad.append(f"rank {r} did not exit within {TEARDOWN_S:g} s of reporting")
        elif p.exitcode < 0:
            bad.append(f"rank {r} died after reporting (signal {_signal_name(-p.exitcode)})")
        elif p.exitcode != 0:
            bad.append(f"rank {r} exited with code {p.exitcode} after reporting")
    return "; ".join(bad) or None


def innermost_frame(dump: str) -> str | None:
    """Where the checks' thread is, from a faulthandler dump of a rank's threads."""
    blocks = re.split(r"^(?=(?:Current thread|Thread) 0x)", dump, flags=re.M)
    for block in blocks:
        if "in run_checks" not in block:
            continue
        m = re.search(r'File "([^"]+)", line (\d+) in (\S+)', block)
        if m:
            path, line, func = m.groups()
            where = f"{os.path.basename(path)}:{line} {func}"
            if f"{os.sep}distributed{os.sep}" in path:
                return f"waiting in a collective ({where})"
            return f"at {where}"
    return None


def _where_stuck(procs, stack_files, ranks) -> dict[int, str]:
    """Asks the stuck ranks for their stacks (POSIX only) and returns their innermost frames."""
    if not stack_files:
        return {}
    for r in ranks:
        with contextlib.suppress(OSError):
            os.kill(procs[r].pid, signal.SIGUSR1)
    time.sleep(0.5)
    found = {}
    for r in ranks:
        with contextlib.suppress(OSError), open(stack_files[r]) as f:
            where = innermost_frame(f.read())
            if where:
                found[r] = where
    return found


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _ranks(ranks) -> str:
    return ", ".join(map(str, ranks))
