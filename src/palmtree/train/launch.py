"""Starting the ranks of ``palmtree train``, once the flags are parsed.

Without torchrun it spawns ``--nproc`` CPU processes (gloo on a free loopback port), or
trains in this process for ``--nproc 1``; under torchrun (``RANK`` and ``WORLD_SIZE``
set) every launched process joins the given world, with NCCL when CUDA is available
(:func:`palmtree.launch_utils.launched_rank`). Either way the ranks set up and tear
down their process group with :mod:`palmtree.launch_utils`, and the launching process
holds the run folder's lock (:class:`~.rundir.RunLock`) for the whole run.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from dataclasses import replace

import torch
import torch.distributed as dist

from ..distributed import free_port, launched_world
from ..launch_utils import (
    LaunchedRank,
    init_process_group,
    launched_rank,
    process_group,
    shutdown_process_group,
)
from .config import RankContext, TrainConfig
from .data import Prepared, TrainError
from .loop import train_rank
from .prepare import load_data, load_resume, open_run_dir, report_data

TIMEOUT = datetime.timedelta(minutes=10)


def run(cfg: TrainConfig, t0: float) -> int:
    """Trains as ``cfg`` says; returns the exit status (2 for a :class:`TrainError`)."""
    try:
        if launched_world():
            return _run_torchrun(cfg, t0)
        return _run_spawned(cfg, t0)
    except TrainError as exc:
        print(f"palmtree train: error: {exc}", file=sys.stderr)
        return 2


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- spawn


def _run_spawned(cfg: TrainConfig, t0: float) -> int:
    resume = load_resume(cfg)
    prepared = load_data(cfg, resume)  # bad data stops before the run folder is touched
    report_data(prepared)
    cfg, lock = open_run_dir(cfg, resume)  # cfg now names the run's folder
    with lock:
        threads = max(1, cpu_cores() // cfg.nproc)
        if cfg.nproc == 1:
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                ctx = RankContext(0, 1, 0, torch.device("cpu"), "single")
                train_rank(ctx, cfg, prepared, t0)
            finally:
                torch.set_num_threads(previous)
            return 0
        port = free_port()
        return spawn_ranks(_spawned_rank, cfg.nproc, (cfg, prepared, port, threads, t0))


def spawn_ranks(fn, nprocs: int, fn_args: tuple) -> int:
    """Runs ``fn(rank, *fn_args)`` in ``nprocs`` spawned processes; returns the exit status.

    When a rank fails, ``torch.multiprocessing.spawn`` stops the others and raises in
    the parent, which reports it once (:func:`report_rank_failure`) and returns 1.
    """
    import torch.multiprocessing as mp

    try:
        mp.spawn(fn, args=fn_args, nprocs=nprocs, join=True)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        report_rank_failure(exc)
        return 1
    return 0


def report_rank_failure(exc: Exception) -> None:
    """Prints ``palmtree train: rank R failed: Type: message`` to stderr.

    The rank's traceback comes first, except for a :class:`TrainError` (bad data or
    flags found inside a rank), whose message says everything.
    """
    import torch.multiprocessing as mp

    if isinstance(exc, mp.ProcessExitedException):
        how = f"signal {exc.signal_name}" if exc.signal_name else f"exit code {exc.exit_code}"
        print(f"palmtree train: rank {exc.error_index} died ({how})", file=sys.stderr)
        return
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else repr(exc)
    if "TrainError: " in last:
        last = last.split("TrainError: ", 1)[1]
    else:
        print(text, file=sys.stderr)
    print(f"palmtree train: rank {exc.error_index} failed: {last}", file=sys.stderr)


def _spawned_rank(
    rank: int, cfg: TrainConfig, prepared: Prepared, port: int, threads: int, t0: float
) -> None:
    torch.set_num_threads(threads)
    with process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=cfg.nproc,
        timeout=TIMEOUT,
    ):
        ctx = RankContext(rank, cfg.nproc, rank, torch.device("cpu"), "spawn")
        train_rank(ctx, cfg, prepared, t0)  # returns with its DDP model gone


# --------------------------------------------------------------------------- torchrun


def _run_torchrun(cfg: TrainConfig, t0: float) -> int:
    me = launched_rank()
    if me.device.type == "cpu":
        torch.set_num_threads(max(1, cpu_cores() // me.local_world_size))
    init_process_group(me.backend, timeout=TIMEOUT)
    lock = None
    try:
        cfg, prepared, lock, error = _ready_every_rank(cfg, me)
        if error is not None:
            if me.rank == 0:
                print(f"palmtree train: error: {error}", file=sys.stderr)
            shutdown_process_group()  # every rank is here: the teardown cannot block
            return 2
        ctx = RankContext(me.rank, me.world_size, me.local_rank, me.device, "torchrun")
        train_rank(ctx, cfg, prepared, t0)  # returns with its DDP model gone
    except Exception as exc:
        # This rank alone may have failed: the others can be inside a collective, so the
        # group is left for the process exit, and torchrun ends the other ranks.
        if isinstance(exc, TrainError):
            print(f"palmtree train: rank {me.rank}: error: {exc}", file=sys.stderr)
            return 2
        print(f"palmtree train: rank {me.rank} failed:", file=sys.stderr)
        traceback.print_exc()
        return 1
    finally:
        if lock is not None:
            lock.release()
    shutdown_process_group()
    return 0


def _ready_every_rank(cfg: TrainConfig, me: LaunchedRank):
    """``(cfg, prepared, lock, error)``: every rank reads the checkpoint and the data
    itself, rank 0 also takes the run folder (``lock``) and chooses its name, which
    every rank's ``cfg`` then holds. ``error`` is the first problem of any rank, the
    same on every rank, so that all of them stop together."""
    error, prepared, lock = None, None, None
    try:
        resume = load_resume(cfg)
        prepared = load_data(cfg, resume)
        if me.rank == 0:
            report_data(prepared)
            cfg, lock = open_run_dir(cfg, resume)
    except TrainError as exc:
        error = str(exc)
    answers: list[tuple[str | None, str | None]] = [(None, None)] * me.world_size
    dist.all_gather_object(answers, (error, cfg.name))
    for r, (message, _) in enumerate(answers):
        if message is not None:
            if lock is not None:
                lock.release()
            message = message if me.world_size == 1 else f"rank {r}: {message}"
            return cfg, None, None, message
    return replace(cfg, name=answers[0][1]), prepared, lock, None
