"""How one case is measured: time, peak memory, out-of-memory, and the isolated worker.

* time: the median of ``repeats`` runs after ``warmup`` runs (CUDA events on a GPU,
  ``perf_counter`` on a CPU);
* memory: extra memory over what the inputs already hold. On CUDA the allocator's peak
  minus what was allocated before the first run; on a CPU the growth of the process's
  peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` after the inputs exist;
  ``ru_maxrss`` where that is unavailable), each case in a fresh process
  (:func:`run_case_in_process`) so that no case inherits another's heap;
* running out of memory is a result (status ``oom``), not a crash.

A result is a dict: ``status`` (``ok``, ``oom``, ``skip``, ``error``, ``timeout``),
``note``, and for ``ok`` the timed runs (``times``, ``median_ms``, ``min_ms`` and their
spread, :func:`timing`), ``peak_mb``, ``loss`` and the correctness columns of
:mod:`palmtree.bench.check`; for ``chunked+compile`` also ``compile_s`` and ``graphs``
(:func:`palmtree.bench.compiled.first_call`).
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import compiled
from .cases import (
    SCALAR_GRADS,
    Case,
    case_context,
    loss_fn,
    make_inputs,
    make_targets,
    scalar_leaves,
)
from .check import compare

#: Marks the worker's result line on its stdout (anything else there is ignored).
RESULT_MARK = "PALMTREE_BENCH_RESULT "


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _ru_maxrss_kb() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


class PeakMemory:
    """Extra memory from :meth:`start` to :meth:`peak_mb`, per device."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        self.hwm = False
        try:  # "5" resets the peak RSS to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm = _proc_status_kb("VmHWM") is not None
        except OSError:
            pass
        self.base = _proc_status_kb("VmRSS") if self.hwm else _ru_maxrss_kb()

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        peak = _proc_status_kb("VmHWM") if self.hwm else _ru_maxrss_kb()
        return max(0, peak - self.base) / 1024


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed (CUDA, the CPU allocator, an rlimit)."""
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "bad_alloc" in text


def one_line(exc: BaseException) -> str:
    """An exception as one short line for the ``note`` column."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text[:200]


def limit_address_space(extra_mb: int) -> None:
    """Caps virtual memory at the current size plus ``extra_mb``: an allocation past it
    raises (recorded as OOM) instead of waking the kernel's OOM killer."""
    size_kb = _proc_status_kb("VmSize")
    if size_kb is None:
        return
    limit = (size_kb << 10) + (extra_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def timing(times: list[float]) -> dict:
    """The timed runs summarised: ``median_ms``, ``min_ms``, and their spread.

    The spread is the interquartile range: ``q1_ms`` and ``q3_ms`` are the quartiles of
    ``statistics.quantiles(method="inclusive")`` (for 5 runs the 2nd and 4th fastest, so
    one outlier on either side moves neither), ``spread = (q3 - q1) / median``. One run
    has no spread: all three are then ``None``.
    """
    median = statistics.median(times)
    out = dict(median_ms=median, min_ms=min(times), q1_ms=None, q3_ms=None, spread=None)
    if len(times) >= 2:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
        out.update(q1_ms=q1, q3_ms=q3, spread=(q3 - q1) / median)
    return out


def run_case(case: Case, oracle: dict | None = None) -> dict:
    """Runs one case in this process and returns its result dict.

    ``oracle`` (or the file ``case.oracle``) gives the correctness columns; it is loaded
    only after the memory has been measured.
    """
    device = torch.device(case.device)
    if case.threads:
        torch.set_num_threads(case.threads)
    with case_context(case, device):
        return _measure(case, device, oracle)


def _measure(case: Case, device: torch.device, oracle: dict | None) -> dict:
    result = dict(median_ms=None, min_ms=None, peak_mb=None, loss=None)
    result.update(loss_diff=None, grad_diff=None, status="ok", note="")
    img, txt = make_inputs(case.batch, case.dim, case.seed, device)
    extras = make_targets(case.targets, case.batch, case.dim, case.seed, device)
    neg = extras.get("text_negatives")
    scalars = scalar_leaves(case, device)
    leaves = (img, txt, *scalars)
    graded = (img, txt, *([] if neg is None else [neg]))  # the tensors with gradients
    for t in graded:
        t.requires_grad_()
    fn = loss_fn(case)

    def step() -> torch.Tensor:
        for t in (*graded, *scalars):
            t.grad = None
        loss = fn(img, txt, *scalars, **extras)
        loss.backward()
        return loss.detach()

    try:
        result.update(_first_call(case, fn, leaves, extras, device))
        times, peak_mb, loss = _timed_runs(case, device, step)
    except Exception as exc:  # running out of memory is a result, not a crash
        if not is_oom(exc):
            raise
        result.update(status="oom", note=one_line(exc))
        return result
    result.update(times=times, **timing(times))
    result.update(peak_mb=peak_mb, loss=float(loss))

    if oracle is None and case.oracle:
        oracle = torch.load(case.oracle)
    if oracle is not None:
        grads = dict(d_img=img.grad, d_txt=txt.grad)
        grads.update(zip(SCALAR_GRADS[case.loss], (t.grad for t in scalars), strict=True))
        if neg is not None:
            grads["d_neg"] = neg.grad
        result.update(compare(case.precision, loss, grads, oracle))
    if not math.isfinite(result["loss"]):
        result.update(status="error", note="non-finite loss")
    return result


def _first_call(case: Case, fn, leaves: tuple, extras: dict, device: torch.device) -> dict:
    """One call before anything is measured, so that lazy one-time state (thread pools,
    kernel caches, Triton compilation) counts neither as time nor as the loss's memory:
    on 8 pairs (and the first 8 labels and negatives), or for ``chunked+compile`` at the
    case's own shape, which compiles it (its time is then the row's compile time,
    :func:`~palmtree.bench.compiled.first_call`).
    """
    if case.impl == compiled.COMPILED:
        return compiled.first_call(fn, leaves, device, extras)
    img, txt, *scalars = leaves
    tiny = [t.detach()[:8].clone().requires_grad_() for t in (img, txt)]
    few = {
        k: v.detach()[:8].clone().requires_grad_(v.is_floating_point()) for k, v in extras.items()
    }
    fn(*tiny, *scalars, **few).backward()
    for t in scalars:
        t.grad = None
    return {}


def _timed_runs(case: Case, device: torch.device, step) -> tuple[list[float], float, torch.Tensor]:
    """``warmup + repeats`` calls of ``step``: the timed ones (ms), peak MB, last loss."""
    memory = PeakMemory(device)
    if case.mem_limit_mb and device.type == "cpu":
        limit_address_space(case.mem_limit_mb)
    times = []
    memory.start()
    with compiled.steady(case.impl):
        for i in range(case.warmup + case.repeats):
            if device.type == "cuda":
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                loss = step()
                end.record()
                end.synchronize()
                elapsed = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                loss = step()
                elapsed = (time.perf_counter() - t0) * 1e3
            if i >= case.warmup:
                times.append(elapsed)
    return times, memory.peak_mb(), loss


def worker(case_json: str) -> int:
    """``python -m palmtree.bench --case JSON``: one case, its result on one stdout line."""
    case = Case(**json.loads(case_json))
    try:
        result = run_case(case)
    except Exception as exc:
        result = dict(status="error", note=one_line(exc))
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


def run_case_in_process(case: Case, timeout: float | None) -> dict:
    """Runs ``case`` in a fresh Python process (so peak RSS is the case's own)."""
    cmd = [sys.executable, "-m", "palmtree.bench", "--case", json.dumps(asdict(case))]
    return run_worker(cmd, timeout)


def run_worker(cmd: list[str], timeout: float | None) -> dict:
    """Runs a worker command that prints its result as ``RESULT_MARK + json`` on stdout;
    a timeout, a SIGKILL (most likely the memory cap) or a crash become a status row."""
    # The worker imports this same palmtree: src/, two folders above this file.
    src = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(status="timeout", note=f"no result within {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    if proc.returncode in (-9, 137):
        return dict(status="oom", note="worker killed (SIGKILL), most likely out of memory")
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(status="error", note=f"worker exited with {proc.returncode}: {tail[:200]}")
