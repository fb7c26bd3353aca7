"""A rank of a world that torchrun launched (one node or many).

Each rank joins the default group (NCCL on GPUs, gloo on CPUs:
:func:`palmtree.launch_utils.launched_rank`) and runs the checks; a watchdog ends the
rank at the timeout, naming the step it was at, and torchrun then ends the others.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from dataclasses import asdict
from datetime import timedelta

import torch.distributed as dist

from ..launch_utils import LaunchedRank, init_process_group, shutdown_process_group
from .checks import run_checks
from .options import Options
from .spawn import Outcome


def check_in_launched_world(opts: Options, me: LaunchedRank) -> Outcome:
    """Runs the checks on this rank; every rank returns the same rows."""
    step = ["joining the process group"]

    def expire():
        print(
            f"palmtree verify: timed out after {opts.timeout:g} s: rank {me.rank} did not "
            f"finish (at: {step[0]})",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    watchdog = threading.Timer(opts.timeout, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        if not dist.is_initialized():
            init_process_group(me.backend, timeout=timedelta(seconds=opts.timeout))
        try:
            rows = run_checks(
                me.rank, me.world_size, me.device, opts, lambda s: step.__setitem__(0, s)
            )
        except Exception as exc:
            # The group is left alone: the others may still wait on this rank in a
            # collective, and torchrun ends them once this rank exits.
            detail = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            return Outcome(error=f"rank {me.rank} failed: {detail}")
        step[0] = "shutting down the process group"
        shutdown_process_group()
        return Outcome(rows=[asdict(r) for r in rows])
    finally:
        watchdog.cancel()
