"""Starting and ending the default process group, for palmtree's commands and examples.

``palmtree train`` (spawned ranks and torchrun), ``palmtree verify`` and the DDP
examples set up and tear down their process group here, so that a finished run exits
with status 0 instead of dying at the finish line.

Why this needs care. A rank that exits while its gloo process group is still alive can
abort with ``terminate called without an active exception`` (SIGABRT) after all its work
is done. Gloo runs every collective on worker threads, and a worker drops the last
reference to a finished collective (and so to its tensors) *after* the rank's ``wait()``
has returned. Freeing a tensor that Python created needs the GIL. If the interpreter is
already finalizing by then, CPython ends the worker thread inside that C++ destructor
(``pthread_exit`` unwinding through a ``noexcept`` frame), which calls
``std::terminate``. ``destroy_process_group()`` prevents this by joining the workers
while Python is fully alive, but only if it really frees the group. Two things keep the
group alive past it:

* ``torch.distributed.nn.functional`` binds the live default group as a default argument
  of its functions (``group=group.WORLD``) when it is first imported. Building a
  ``DistributedDataParallel`` imports it (through ``torch._dynamo``), so a process that
  builds DDP *after* ``init_process_group`` holds the group until exit.
  :func:`init_process_group` imports it first, while ``group.WORLD`` is still ``None``.
* A DDP reducer that is still alive holds the group from C++. Dropped after the group's
  teardown, it frees the group while holding the GIL, and joining the gloo workers can
  then deadlock with a worker that waits for the GIL. :func:`shutdown_process_group`
  therefore expects every DDP model of the rank to be gone, and collects reference
  cycles before destroying the group.

The library itself (``palmtree.clip_loss``) never imports this module.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LaunchedRank:
    """This process's place in a world a launcher (torchrun) started, and its device:
    the CUDA device ``LOCAL_RANK`` with NCCL where CUDA is available, else the CPU and gloo."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str


def launched_rank() -> LaunchedRank:
    """Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (set by torchrun)
    and selects this rank's device (``torch.cuda.set_device`` on GPUs)."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return LaunchedRank(rank, world_size, local_rank, local_world, device, "nccl")
    return LaunchedRank(rank, world_size, local_rank, local_world, torch.device("cpu"), "gloo")


def init_process_group(backend: str | None = None, **kwargs) -> None:
    """``torch.distributed.init_process_group(backend, **kwargs)``, done so that the
    group can be freed again by :func:`shutdown_process_group` (see the module notes)."""
    import torch.distributed.nn  # noqa: F401  (binds group.WORLD while it is still None)

    dist.init_process_group(backend, **kwargs)


def shutdown_process_group() -> None:
    """Ends the default process group once every rank has finished with it.

    Call it on every rank, after the last collective, once the rank's DDP models are
    gone (returned from the function that built them, or deleted). A barrier first, so
    that no rank tears down while another still talks to it; then reference cycles are
    collected, so a DDP reducer caught in one lets go of the group while the group is
    still registered; then the group is destroyed, which joins its worker threads. Does
    nothing when no group is initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


@contextlib.contextmanager
def process_group(backend: str | None = None, **kwargs):
    """Initialises the default process group, and on normal exit shuts it down.

    When the body raises, the group is left alone: another rank may still be inside a
    collective with this one, so a barrier or the join of gloo's workers could wait
    until the collective timeout. The error propagates at once instead, and the
    launcher (``torch.multiprocessing.spawn``, torchrun) ends the other ranks.
    """
    init_process_group(backend, **kwargs)
    yield
    shutdown_process_group()
