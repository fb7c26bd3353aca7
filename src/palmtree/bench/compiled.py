"""``chunked+compile``: the chunked backend's loss inside ``torch.compile``, a bench-only
implementation.

What is compiled is the whole loss the bench times for every implementation,
``loss(img, txt, *scalars)`` (the features' normalisation and the single-pass chunked
loss, :func:`~palmtree.bench.cases.loss_fn`), by Inductor, with static shapes
(``dynamic=False``): each case has one shape. Its backward is the graph AOTAutograd
compiles with the forward, so the timed ``loss.backward()`` runs compiled code too.

* **Compiled once, before anything is measured** (:func:`first_call`): one forward and
  backward at the case's own shape, after ``torch._dynamo.reset()`` so that no earlier
  case's graphs are reused. Its time is the row's compile time, reported in the note
  (:func:`compile_note`), never in the timed runs; its memory is not the loss's either.
* **No compilation while timing** (:func:`steady`): the warm-up and timed runs run under
  ``torch.compiler.set_stance("fail_on_recompile")``, so a guard that failed there is an
  error row, not a compilation hidden in a median.
* The note also gives the number of graphs Dynamo compiled: ``1`` once the loss traces
  with ``fullgraph=True``, more while it has graph breaks (each break runs eagerly).

The library never picks it: ``backend="auto"`` chooses among palmtree's backends, and this
is a way of calling one of them.
"""

from __future__ import annotations

import contextlib
import time

import torch

from ..backends import triton_available

#: The implementation's name in ``--backends`` and in the CSV's ``impl`` column.
COMPILED = "chunked+compile"
#: ``torch.compile``'s ``dynamic``: off, each case is compiled for its one shape.
DYNAMIC = False
#: How the compile part of a row's note begins.
NOTE_START = "compiled before timing in"


def skip_reason(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot run the loss here (``None`` if it can)."""
    try:
        torch._dynamo.eval_frame.check_if_dynamo_supported()
    except RuntimeError as exc:
        return f"torch.compile cannot run here: {exc}"
    if device.type == "cuda":
        return None if triton_available() else "torch.compile on CUDA needs Triton"
    try:  # Inductor writes C++ for the CPU and builds it with the machine's compiler
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:
        return f"torch.compile on a CPU needs a C++ compiler ({type(exc).__name__})"
    return None


def compile_loss(fn):
    """``fn`` compiled by Inductor (``dynamic=DYNAMIC``), Dynamo's caches emptied first."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=DYNAMIC)


def first_call(
    fn, leaves: tuple[torch.Tensor, ...], device: torch.device, extras: dict | None = None
) -> dict:
    """One forward and backward of the compiled ``fn`` on ``leaves`` (and the keywords
    ``extras``: labels, extra negatives), which compiles it.

    Returns ``compile_s`` (its seconds, the run's own work included) and ``graphs`` (how
    many graphs Dynamo compiled); the gradients of the leaves and extras are reset to
    ``None``.
    """
    from torch._dynamo.utils import counters

    extras = extras or {}
    counters.clear()
    t0 = time.perf_counter()
    fn(*leaves, **extras).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    for t in (*leaves, *extras.values()):
        t.grad = None
    return dict(compile_s=seconds, graphs=int(counters["stats"]["unique_graphs"]))


def steady(impl: str):
    """What the warm-up and timed runs of ``impl`` run inside: compiled code only."""
    if impl != COMPILED:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("fail_on_recompile")


def compile_note(rounds: list[dict]) -> str:
    """The note's compile part, from the rounds that ran (``""`` if none compiled):
    ``compiled before timing in 14.2 s (dynamic=False, 8 graphs)``; with several rounds,
    each round's seconds (``14.2, 6.1, 6.0 s``: a later process may find Inductor's
    on-disk cache)."""
    runs = [r for r in rounds if r.get("compile_s") is not None]
    if not runs:
        return ""
    seconds = ", ".join(f"{r['compile_s']:.1f}" for r in runs)
    graphs = "/".join(str(g) for g in dict.fromkeys(r["graphs"] for r in runs))
    plural = "" if graphs == "1" else "s"
    return f"{NOTE_START} {seconds} s (dynamic={DYNAMIC}, {graphs} graph{plural})"
