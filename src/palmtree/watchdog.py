"""What a rank says when the loss's exchange waits for the other ranks, or fails.

Every rank of the group takes part in the loss's first all-gather. A rank that calls the
loss alone (an evaluation under ``if rank == 0``, a loop that ran one step more) waits
there until the group's timeout, minutes later, or dies with the process-group backend's
bare error once another rank has exited. :func:`exchange_watch` turns both into words:
after :data:`WARN_AFTER_S` seconds (``PALMTREE_EXCHANGE_WARN_S`` overrides it) a warning
on the ``palmtree`` logger says why a rank may be waiting and how to compute the loss on
one process; a failed collective is re-raised with the same explanation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

#: Seconds in the exchange before the warning (the wait itself goes on).
WARN_AFTER_S = 120.0

_HINT = (
    "every rank of the group must call the loss (and backpropagate it) the same number "
    "of times; to compute it on this process's tensors alone while a process group is "
    "up, pass distributed=False"
)

log = logging.getLogger("palmtree")


def warn_after_s() -> float:
    """:data:`WARN_AFTER_S`, or the value of ``PALMTREE_EXCHANGE_WARN_S``."""
    value = os.environ.get("PALMTREE_EXCHANGE_WARN_S")
    try:
        return float(value) if value else WARN_AFTER_S
    except ValueError:
        return WARN_AFTER_S


@contextlib.contextmanager
def exchange_watch(rank: int, world_size: int):
    """Warns if the block (the exchange) runs longer than :func:`warn_after_s`, and
    re-raises a failed collective with what the ranks must do."""
    after = warn_after_s()
    where = f"rank {rank} of {world_size}"
    timer = threading.Timer(
        after,
        log.warning,
        args=(
            f"palmtree: {where} has waited {after:g} s for the other ranks in the loss's "
            f"exchange; {_HINT}",
        ),
    )
    timer.daemon = True
    timer.start()
    try:
        yield
    except RuntimeError as exc:  # the backend's error (gloo: a peer closed the connection)
        raise RuntimeError(
            f"palmtree: the loss's exchange failed on {where} ({type(exc).__name__}: {exc}); "
            f"another rank may have stopped or be elsewhere: {_HINT}"
        ) from exc
    finally:
        timer.cancel()
