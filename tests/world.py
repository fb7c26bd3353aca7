"""A pool of spawned gloo ranks on loopback, started once and reused by many cases.

Spawning costs seconds per world on a small machine (each rank imports torch), so a
test module starts each world size once and sends it many cases. A case is a
module-level function ``fn(rank, world_size, *args)``; every rank runs it and the
per-rank results (or the exception each rank raised) come back to the test.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass

import torch.multiprocessing as mp

from palmtree.distributed import free_port


@dataclass
class Raised:
    """A case that raised on one rank: the exception's type name and message."""

    type: str
    message: str
    traceback: str


def _worker(rank, world_size, port, tasks, results):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    from palmtree.launch_utils import init_process_group, shutdown_process_group

    torch.set_num_threads(1)
    if world_size > 0:
        init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
    while True:
        job = tasks.get()
        if job is None:
            break
        fn, args, kwargs = job
        try:
            out = fn(rank, max(world_size, 1), *args, **kwargs)
        except BaseException as exc:  # the test decides whether raising was right
            out = Raised(type(exc).__name__, str(exc), traceback.format_exc())
        results.put((rank, out))
    if world_size > 0:
        shutdown_process_group()  # a barrier, then a teardown that frees gloo's threads


class World:
    """``World(n)`` starts n gloo ranks; ``World(0)`` one process with no process group."""

    def __init__(self, world_size: int, timeout: float = 120.0):
        ctx = mp.get_context("spawn")
        self.size = max(world_size, 1)
        self.timeout = timeout
        port = free_port()
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(self.size)]
        self.procs = [
            ctx.Process(
                target=_worker, args=(r, world_size, port, self.tasks[r], self.results), daemon=True
            )
            for r in range(self.size)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, expect_raise: bool = False, **kwargs) -> list:
        """Runs ``fn`` on every rank; returns the per-rank results in rank order.

        A rank that raised makes this raise with its traceback, unless
        ``expect_raise``, in which case the :class:`Raised` records are returned.
        """
        for q in self.tasks:
            q.put((fn, args, kwargs))
        out = [None] * self.size
        for _ in range(self.size):
            try:
                rank, value = self.results.get(timeout=self.timeout)
            except Exception as exc:
                self.close(kill=True)
                raise TimeoutError(f"{fn.__name__}: a rank did not answer (hang?)") from exc
            out[rank] = value
        raised = [r for r in out if isinstance(r, Raised)]
        if raised and not expect_raise:
            self.close(kill=True)
            raise AssertionError("\n".join(r.traceback for r in raised))
        return out

    def close(self, kill: bool = False):
        for q, p in zip(self.tasks, self.procs, strict=True):
            if p.is_alive() and not kill:
                q.put(None)
        for p in self.procs:
            p.join(timeout=0 if kill else 10)
            if p.is_alive():
                p.kill()
