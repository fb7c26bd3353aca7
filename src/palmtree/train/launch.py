"""``palmtree train``: parse flags, prepare the data once, start the ranks.

Without torchrun it spawns ``--nproc`` CPU processes (gloo on a free loopback port);
under torchrun (``RANK`` and ``WORLD_SIZE`` set) every launched process
joins the given world, with NCCL when CUDA is available.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from ..distributed import free_port, launched_world
from . import checkpoint
from .data import Prepared, TrainError, prepare_csv, prepare_digits
from .loop import RankContext, train_rank
from .options import parse_args
from .tokenizer import WordTokenizer

OWN_FILES = ("metrics.jsonl", "results.json", "curves.png")
TIMEOUT = datetime.timedelta(minutes=10)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``palmtree train``; returns the exit status."""
    t0 = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage and the error
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if launched_world():
            return _run_torchrun(args, t0)
        return _run_spawned(args, t0)
    except TrainError as exc:
        print(f"palmtree train: error: {exc}", file=sys.stderr)
        return 2


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def prepare(args, tokenizer: WordTokenizer | None = None) -> Prepared:
    """Loads and validates the data; a ``tokenizer`` from a checkpoint keeps its vocabulary."""
    if args.train_data is None:
        prepared = prepare_digits(
            args.test_fraction, args.seed, args.context_length, args.vocab_size, tokenizer
        )
    else:
        prepared = prepare_csv(
            args.train_data,
            args.val_data,
            args.csv_img_key,
            args.csv_caption_key,
            args.csv_separator,
            args.image_size,
            args.max_bad_fraction,
            args.seed,
            args.context_length,
            args.vocab_size,
            tokenizer,
        )
    return prepared


def resume_tokenizer(args) -> WordTokenizer | None:
    """The tokenizer of the checkpoint ``--resume`` names (``None`` for a fresh run)."""
    resume = checkpoint.resolve_resume(args.resume, Path(args.logs) / args.name)
    if resume is None:
        return None
    return WordTokenizer.from_state_dict(checkpoint.load(resume)["tokenizer"])


def clear_run_dir(args) -> None:
    """Creates ``logs/name``; a fresh run first removes this command's own files from it."""
    run_dir = Path(args.logs) / args.name
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.resume is not None:
        return
    for name in OWN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir():
        for f in ckpts.glob("*.pt"):
            f.unlink()


def _report_data(prepared: Prepared) -> None:
    report = prepared.report
    for split in ("train", "val"):
        info = report.get(split)
        if isinstance(info, dict) and info.get("bad_rows"):
            reasons = ", ".join(f"{n} {r}" for r, n in info["bad_by_reason"].items())
            print(
                f"palmtree train: skipped {info['bad_rows']} of {info['rows']} {split} rows "
                f"({reasons}); first: {'; '.join(info['bad_examples'])}",
                file=sys.stderr,
            )


# --------------------------------------------------------------------------- spawn


def _run_spawned(args, t0: float) -> int:
    prepared = prepare(args, resume_tokenizer(args))  # bad data stops before anything is cleared
    _report_data(prepared)
    clear_run_dir(args)
    threads = max(1, cpu_cores() // args.nproc)
    if args.nproc == 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            ctx = RankContext(0, 1, 0, torch.device("cpu"), "single")
            train_rank(ctx, args, prepared, t0)
        finally:
            torch.set_num_threads(previous)
        return 0

    port = free_port()
    return spawn_ranks(_spawned_rank, args.nproc, (args, prepared, port, threads, t0))


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


def _spawned_rank(rank: int, args, prepared: Prepared, port: int, threads: int, t0: float):
    torch.set_num_threads(threads)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=args.nproc, timeout=TIMEOUT)
    try:
        ctx = RankContext(rank, args.nproc, rank, torch.device("cpu"), "spawn")
        train_rank(ctx, args, prepared, t0)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- torchrun


def _run_torchrun(args, t0: float) -> int:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(max(1, cpu_cores() // local_world))
    dist.init_process_group(backend, timeout=TIMEOUT)
    try:
        prepared = prepare(args, resume_tokenizer(args))  # every rank reads the data itself
        if rank == 0:
            _report_data(prepared)
            clear_run_dir(args)
        dist.barrier()
        ctx = RankContext(rank, world_size, local_rank, device, "torchrun")
        train_rank(ctx, args, prepared, t0)
    except TrainError as exc:
        print(f"palmtree train: rank {rank}: error: {exc}", file=sys.stderr)
        return 2
    except Exception:
        print(f"palmtree train: rank {rank} failed:", file=sys.stderr)
        traceback.print_exc()
        return 1
    finally:
        dist.destroy_process_group()
    return 0
