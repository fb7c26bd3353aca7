"""``palmtree bench``: time and peak memory of the loss, per backend, precision and peer.

Every case is one forward+backward of the bidirectional loss on a global batch of
``B`` correlated (image, text) pairs of width ``D``, on one process:

* time: the median of ``--repeats`` runs after ``--warmup`` runs (CUDA events on a
  GPU, ``perf_counter`` on a CPU);
* memory: extra memory over what the inputs already hold. On CUDA the allocator's
  peak minus what was allocated before the first run; on a CPU the growth of the
  process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` after the
  inputs exist; ``ru_maxrss`` where that is unavailable), each case in a fresh
  process so no case inherits another's heap;
* correctness: ``loss_diff = |loss - L| / |L|`` and ``grad_diff``, the largest of
  ``max|g - g*| / max|g*|`` over the gradients of the image features, the text
  features and the log-temperature, against a float64 oracle ``L, g*`` computed once
  per ``(B, D)`` on the same inputs.

Each run appends rows to ``<out>/<name>.csv`` (device, versions, timestamp) and
redraws ``<out>/<name>.png`` (log-log time and memory against ``B``) and
``<out>/<name>.md`` (the table) from the rows of the latest run. Timings are never
asserted anywhere; this is a measuring script.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

import palmtree
from palmtree import clip_loss, peers
from palmtree.backends import BACKENDS, fused_can_run, get_kernels
from palmtree.backends.base import PRECISIONS

FIELDS = (
    "timestamp",
    "device",
    "torch_version",
    "palmtree_version",
    "impl",
    "impl_version",
    "precision",
    "batch",
    "dim",
    "repeats",
    "median_ms",
    "min_ms",
    "peak_mb",
    "loss",
    "loss_diff",
    "grad_diff",
    "status",
    "note",
)
STATUSES = ("ok", "oom", "skip", "error", "timeout")
DEFAULTS = {
    "cpu": dict(batch_sizes=[1024, 2048, 4096, 8192], precisions=["ieee"], repeats=5, warmup=1),
    "cuda": dict(
        batch_sizes=[8192, 32768, 65536, 131072],
        precisions=["ieee", "tf32", "bf16"],
        repeats=5,
        warmup=2,
    ),
}
QUICK = dict(batch_sizes=[64, 128], dims=[32], repeats=1, warmup=1)
#: Text = image direction + this much independent noise: a positive pair's cosine is
#: ~0.55, and with the default temperature and D=512 the loss is ~0.5 at B=1024 and
#: ~3 at B=131072, far from both a trivial batch (0) and an uncorrelated one (log B).
NOISE = 1.5
LOG_SCALE = math.log(1 / 0.07)
SCALE_CAP = 100.0
NORM_EPS = 1e-6
RESULT_MARK = "PALMTREE_BENCH_RESULT "


@dataclass(frozen=True)
class Case:
    impl: str
    precision: str
    batch: int
    dim: int
    device: str
    repeats: int
    warmup: int
    seed: int
    log_scale: float
    chunk_size: int | None = None
    oracle: str | None = None  # file holding the float64 oracle (process isolation)
    mem_limit_mb: int | None = None
    threads: int | None = None  # CPU threads (torch.set_num_threads)


# ----------------------------------------------------------------------------- inputs


def make_inputs(batch: int, dim: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated (image, text) features, fp32, with a spread of norms; never zeros.

    Drawn on the CPU from a seeded generator and then moved, so every process and
    every device sees the same values for the same ``(batch, dim, seed)``.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + batch * 4099 + dim)
    base = torch.randn(batch, dim, generator=g)
    img = base * (1 + torch.rand(batch, 1, generator=g))
    txt = base + NOISE * torch.randn(batch, dim, generator=g)
    return img.to(device), txt.to(device)


# ----------------------------------------------------------------------------- oracle


@torch.no_grad()
def oracle_fp64(
    img: torch.Tensor,
    txt: torch.Tensor,
    log_scale: float,
    cap: float = SCALE_CAP,
    chunk: int | None = None,
) -> dict[str, torch.Tensor]:
    """Float64 loss and gradients of the single-process loss, in column chunks.

    Same function as :func:`palmtree.clip_loss` (fp32 L2 normalisation with eps 1e-6,
    ``s = min(exp(log_scale), cap)``, mean of both cross-entropies), computed without
    the ``B x B`` matrix so that it fits wherever the benchmark does. Returns CPU
    tensors: ``loss``, ``d_img``, ``d_txt``, ``d_scale`` (gradient w.r.t. the log-scale).
    """
    x, y = img.double(), txt.double()
    nx = x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    ny = y.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    u, v = x / nx, y / ny
    raw = math.exp(log_scale)
    s = min(raw, cap)
    big = u.shape[0]
    if chunk is None:
        budget = (2 << 30) if u.is_cuda else (32 << 20)
        chunk = max(1, min(big, budget // (8 * big)))
    diag = s * (u * v).sum(1)
    row_max = torch.full((big,), -math.inf, dtype=torch.float64, device=u.device)
    row_sum = torch.zeros_like(row_max)
    col_lse = torch.empty_like(row_max)
    for c0 in range(0, big, chunk):
        c1 = min(c0 + chunk, big)
        logits = s * (u @ v[c0:c1].T)
        col_lse[c0:c1] = torch.logsumexp(logits, 0)
        new_max = torch.maximum(row_max, logits.amax(1))
        row_sum *= torch.exp(row_max - new_max)
        row_sum += torch.exp(logits - new_max[:, None]).sum(1)
        row_max = new_max
    row_lse = row_max + torch.log(row_sum)
    loss = ((row_lse - diag).sum() + (col_lse - diag).sum()) / (2 * big)

    du, dv = torch.zeros_like(u), torch.zeros_like(v)
    ds = torch.zeros((), dtype=torch.float64, device=u.device)
    for c0 in range(0, big, chunk):
        c1 = min(c0 + chunk, big)
        logits = s * (u @ v[c0:c1].T)
        g = torch.exp(logits - row_lse[:, None]) + torch.exp(logits - col_lse[None, c0:c1])
        idx = torch.arange(c0, c1, device=u.device)
        g[idx, idx - c0] -= 2.0
        g /= 2 * big
        ds += (g * logits).sum() / s
        du += s * (g @ v[c0:c1])
        dv[c0:c1] = s * (g.T @ u)
    # Through the normalisation: d/dx (x/|x|) projects out the radial part.
    d_img = (du - u * (u * du).sum(1, keepdim=True)) / nx
    d_txt = (dv - v * (v * dv).sum(1, keepdim=True)) / ny
    d_scale = ds * s if raw <= cap else torch.zeros_like(ds)
    out = {"loss": loss, "d_img": d_img, "d_txt": d_txt, "d_scale": d_scale}
    return {k: t.cpu() for k, t in out.items()}


def _rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = float(b.abs().max())
    err = float((a - b).abs().max())
    return err / scale if scale > 0 else err


# ----------------------------------------------------------------------------- impls


def _precision_ctx(impl: str, precision: str, device: torch.device):
    """How a peer (which has no precision argument) is put in each mode."""
    if impl in peers.PEERS and precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if device.type == "cuda":
        return _Tf32(precision == "tf32")
    return contextlib.nullcontext()


class _Tf32:
    """Sets ``torch.backends.cuda.matmul.allow_tf32`` for the duration."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.enabled

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.old


def skip_reason(impl: str, precision: str, device: torch.device) -> str | None:
    """Why a case cannot run here, decided before it is started; ``None`` if it can."""
    if impl in BACKENDS:
        if impl == "fused" and not fused_can_run(device):
            return f"fused needs CUDA and Triton (device is {device.type})"
        return None
    why = peers.peer_status(impl, device)
    if why is not None:
        return why
    if impl == "inf_cl" and precision != "tf32":
        return "Inf-CL computes in TF32 only (run it with --precisions tf32)"
    if impl == "open_clip" and precision == "tf32" and device.type != "cuda":
        return "no TF32 on a CPU"
    return None


def _loss_fn(case: Case) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    if case.impl in BACKENDS:
        if case.impl in ("chunked", "fused"):
            get_kernels(case.impl)  # import now, not inside the measured region

        def run(img, txt, log_scale):
            out = clip_loss(
                img,
                txt,
                log_scale,
                backend=case.impl,
                precision=case.precision,
                chunk_size=case.chunk_size,
                logit_scale_max=SCALE_CAP,
            )
            return out.loss

        return run
    if case.impl == "open_clip":
        peers.load_open_clip_loss_module()
        return peers.open_clip_loss
    if case.impl == "inf_cl":
        peers.load_inf_cl()
        return peers.inf_cl_loss
    raise ValueError(f"unknown impl {case.impl!r}")


# ----------------------------------------------------------------------------- memory


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


class _PeakMemory:
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


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "bad_alloc" in text


# ----------------------------------------------------------------------------- one case


def run_case(case: Case, oracle: dict[str, torch.Tensor] | None = None) -> dict:
    """Runs one case in this process and returns its measurements (a result dict).

    ``oracle`` (or the file ``case.oracle``) gives the correctness columns; it is
    loaded only after the memory has been measured.
    """
    device = torch.device(case.device)
    if case.threads:
        torch.set_num_threads(case.threads)
    with contextlib.ExitStack() as stack:
        if case.impl == "inf_cl":  # its temperature gradient all-reduces even on one process
            stack.enter_context(peers.single_rank_group(device))
        stack.enter_context(_precision_ctx(case.impl, case.precision, device))
        return _measure(case, device, oracle)


def _measure(case: Case, device: torch.device, oracle) -> dict:
    result = dict(median_ms=None, min_ms=None, peak_mb=None, loss=None)
    result.update(loss_diff=None, grad_diff=None, status="ok", note="")
    img, txt = make_inputs(case.batch, case.dim, case.seed, device)
    img.requires_grad_()
    txt.requires_grad_()
    log_scale = torch.tensor(case.log_scale, device=device, requires_grad=True)
    leaves = (img, txt, log_scale)
    loss_fn = _loss_fn(case)

    # One tiny call first, so lazy one-time state (thread pools, kernel caches, Triton
    # compilation) is not counted as the loss's memory.
    tiny = [t.detach()[:8].clone().requires_grad_() for t in (img, txt)]
    loss_fn(*tiny, log_scale).backward()
    log_scale.grad = None
    del tiny

    def step() -> torch.Tensor:
        for t in leaves:
            t.grad = None
        loss = loss_fn(img, txt, log_scale)
        loss.backward()
        return loss

    memory = _PeakMemory(device)
    if case.mem_limit_mb and device.type == "cpu":
        _limit_address_space(case.mem_limit_mb)
    times = []
    try:
        memory.start()
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
        result["peak_mb"] = memory.peak_mb()
    except Exception as exc:  # running out of memory is a result, not a crash
        if not _is_oom(exc):
            raise
        result.update(status="oom", note=_one_line(exc))
        return result
    result.update(times=times, median_ms=statistics.median(times), min_ms=min(times))
    result["loss"] = float(loss)

    if oracle is None and case.oracle:
        oracle = torch.load(case.oracle)
    if oracle is not None:
        exact = float(oracle["loss"])
        result["loss_diff"] = abs(float(loss) - exact) / abs(exact)
        result["grad_diff"] = max(
            _rel_max(img.grad, oracle["d_img"]),
            _rel_max(txt.grad, oracle["d_txt"]),
            _rel_max(log_scale.grad, oracle["d_scale"]),
        )
    if not math.isfinite(result["loss"]):
        result.update(status="error", note="non-finite loss")
    return result


def _limit_address_space(extra_mb: int) -> None:
    """Caps virtual memory at the current size plus ``extra_mb``: an allocation past it
    raises (recorded as OOM) instead of waking the kernel's OOM killer."""
    size_kb = _proc_status_kb("VmSize")
    if size_kb is None:
        return
    limit = (size_kb << 10) + (extra_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text[:200]


def _worker(case_json: str) -> int:
    """``python -m palmtree.bench --case JSON``: one case, result on one stdout line."""
    case = Case(**json.loads(case_json))
    try:
        result = run_case(case)
    except Exception as exc:
        result = dict(status="error", note=_one_line(exc))
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


def run_case_in_process(case: Case, timeout: float | None) -> dict:
    """Runs ``case`` in a fresh Python process (so peak RSS is the case's own)."""
    src = str(Path(palmtree.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "palmtree.bench", "--case", json.dumps(asdict(case))]
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


# ----------------------------------------------------------------------------- sweep


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import platform

    model = model or platform.processor() or platform.machine() or "CPU"
    return f"{model} ({torch.get_num_threads()} threads)"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="palmtree bench",
        description="Forward+backward time and peak memory of the CLIP loss per backend, "
        "precision and peer; appends CSV rows and redraws a log-log plot.",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--batch-sizes", type=int, nargs="+", metavar="B", help="global batch sizes")
    p.add_argument("--dims", type=int, nargs="+", metavar="D", default=None, help="default: 512")
    p.add_argument(
        "--backends",
        nargs="*",
        choices=[b for b in BACKENDS if b != "auto"],
        help="default: reference chunked (+ fused on CUDA)",
    )
    p.add_argument(
        "--precisions", nargs="+", choices=PRECISIONS, help="default: ieee (CPU), all (CUDA)"
    )
    p.add_argument(
        "--peers",
        nargs="*",
        choices=peers.PEERS,
        help="peer implementations (default: those that can run here; '--peers' alone: none)",
    )
    p.add_argument("--repeats", type=int, help="timed runs per case (median reported)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole sweep this many times, interleaved, and pool each case's timed "
        "runs: on a shared machine, load then hits every case alike",
    )
    p.add_argument("--warmup", type=int, help="untimed runs before them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--logit-scale",
        type=float,
        default=LOG_SCALE,
        help="log-temperature of the inputs (default ln(1/0.07), CLIP's initial value)",
    )
    p.add_argument("--chunk-size", type=int, help="columns per chunk for 'chunked' (default auto)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", help="file stem of the CSV/PNG/MD (default: from the device name)")
    p.add_argument("--no-plot", action="store_true", help="write only the CSV and the table")
    p.add_argument(
        "--no-check", action="store_true", help="skip the float64 oracle (empty diff columns)"
    )
    p.add_argument(
        "--isolate",
        choices=["process", "none"],
        help="run each case in a fresh process (default on CPU) or in this one (default on CUDA)",
    )
    p.add_argument("--case-timeout", type=float, default=1800, help="seconds per case (process)")
    p.add_argument(
        "--mem-limit-mb",
        type=int,
        help="CPU workers: cap extra address space so a too-large case fails as OOM "
        "instead of invoking the OOM killer",
    )
    p.add_argument("--threads", type=int, help="CPU threads per case (default: torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (for tests)")
    p.add_argument(
        "--plot-only", action="store_true", help="redraw plot and table from the CSV, run nothing"
    )
    p.add_argument("--case", help=argparse.SUPPRESS)
    return p


def _csv_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _append_row(path: Path, row: dict) -> None:
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != FIELDS:
            raise SystemExit(
                f"{path} has other columns ({header}); pick another --name or move the file"
            )
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: _fmt(row.get(k)) for k in FIELDS})


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 and value != 0 else f"{value:.6g}"
    return str(value)


def latest_run(rows: list[dict]) -> list[dict]:
    """The rows written by the most recent run (they share one timestamp)."""
    if not rows:
        return []
    last = max(r["timestamp"] for r in rows)
    return [r for r in rows if r["timestamp"] == last]


def _num(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _series(rows: list[dict]) -> dict[str, list[dict]]:
    dims = {r["dim"] for r in rows}
    out: dict[str, list[dict]] = {}
    for r in rows:
        label = f"{r['impl']} {r['precision']}" + (f" D={r['dim']}" if len(dims) > 1 else "")
        out.setdefault(label, []).append(r)
    return out


def plot(rows: list[dict], path: Path) -> Path | None:
    """Log-log time and peak memory against the batch size; one line per impl/precision."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, series in _series(ok).items():
        series = sorted(series, key=lambda r: int(r["batch"]))
        b = [int(r["batch"]) for r in series]
        for ax, key in zip(axes, ("median_ms", "peak_mb"), strict=True):
            pts = [(x, _num(r[key])) for x, r in zip(b, series, strict=True)]
            pts = [(x, y) for x, y in pts if y is not None and y > 0]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    dims = sorted({r["dim"] for r in ok}, key=int)
    batches = sorted({int(r["batch"]) for r in ok})
    for ax, title in zip(
        axes, ("forward+backward time (ms, median)", "peak extra memory (MB)"), strict=True
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("global batch size B")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{rows[0]['device']}, D={'/'.join(dims)}, torch {rows[0]['torch_version']}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_table(rows: list[dict]) -> str:
    columns = ["impl", "precision", "B", "D", "median (ms)", "min (ms)", "peak (MB)", "loss"]
    columns += ["loss diff", "grad diff", "status"]
    align = ["---"] * 2 + ["---:"] * (len(columns) - 3) + ["---"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    order: dict[tuple[str, str], int] = {}
    for r in rows:
        order.setdefault((r["impl"], r["precision"]), len(order))

    def key(r):
        return order[r["impl"], r["precision"]], int(r["dim"]), int(r["batch"])

    for r in sorted(rows, key=key):
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"
        cells = [r["impl"], r["precision"], r["batch"], r["dim"]]
        keys = ("median_ms", "min_ms", "peak_mb", "loss", "loss_diff", "grad_diff")
        cells += [_short(r[k]) for k in keys]
        lines.append("| " + " | ".join(cells + [status]) + " |")
    return "\n".join(lines)


def _short(text: str) -> str:
    x = _num(text)
    if x is None:
        return ""
    if x == 0:
        return "0"
    if abs(x) < 1e-2:
        return f"{x:.1e}"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def target_summary(rows: list[dict]) -> list[str]:
    """chunked vs reference (same precision, D) at each B both ran: memory and time ratios."""
    ok = {(r["impl"], r["precision"], r["batch"], r["dim"]): r for r in rows if r["status"] == "ok"}
    lines = []
    for (impl, prec, b, d), r in sorted(ok.items(), key=lambda kv: (kv[0][1], int(kv[0][2]))):
        ref = ok.get(("reference", prec, b, d))
        if impl == "reference" or impl not in BACKENDS or ref is None:
            continue
        mem = _num(r["peak_mb"]) / max(_num(ref["peak_mb"]), 1e-9)
        tim = _num(r["median_ms"]) / _num(ref["median_ms"])
        lines.append(
            f"{impl} / reference ({prec}, B={b}, D={d}): memory {mem:.3f}x (1/{1 / mem:.1f}), "
            f"time {tim:.2f}x"
        )
    return lines


def _report(csv_path: Path, no_plot: bool) -> None:
    rows = latest_run(_csv_rows(csv_path))
    if not rows:
        print(f"no rows in {csv_path}")
        return
    table = markdown_table(rows)
    ratios = target_summary(rows)
    md = csv_path.with_suffix(".md")
    text = f"{rows[0]['device']}, torch {rows[0]['torch_version']}, {rows[0]['timestamp']}\n\n"
    md.write_text(text + table + "\n" + "".join(f"\n- {line}" for line in ratios) + "\n")
    print("\n" + table)
    for line in ratios:
        print(line)
    if not no_plot:
        png = plot(rows, csv_path.with_suffix(".png"))
        print(f"\nwrote {csv_path}, {md}" + (f", {png}" if png else ""))
    else:
        print(f"\nwrote {csv_path}, {md}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.case:
        return _worker(args.case)

    kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        print("palmtree bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(kind)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.name or _slug(f"{kind} {device_name(device).split('(')[0]}")
    csv_path = args.out / f"{name}.csv"
    if args.plot_only:
        _report(csv_path, args.no_plot)
        return 0

    defaults = dict(DEFAULTS[kind], dims=[512])
    if args.quick:
        defaults.update(QUICK)
    batch_sizes = args.batch_sizes or defaults["batch_sizes"]
    dims = args.dims or defaults["dims"]
    precisions = args.precisions or defaults["precisions"]
    repeats = args.repeats if args.repeats is not None else defaults["repeats"]
    warmup = args.warmup if args.warmup is not None else defaults["warmup"]
    backends = args.backends
    if backends is None:
        backends = ["reference", "chunked"] + (["fused"] if fused_can_run(device) else [])
    impl_peers = args.peers
    if impl_peers is None:
        impl_peers = [p for p in peers.PEERS if peers.peer_status(p, device) is None]
    isolate = args.isolate or ("process" if kind == "cpu" else "none")
    if repeats < 1 or warmup < 0 or args.rounds < 1:
        print("palmtree bench: --repeats and --rounds must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    common = dict(
        timestamp=stamp,
        device=device_name(device),
        torch_version=torch.__version__,
        palmtree_version=palmtree.__version__,
    )
    print(f"palmtree bench on {common['device']}, torch {torch.__version__}, isolate={isolate}")
    impls = [(b, "palmtree " + palmtree.__version__) for b in backends]
    impls += [(p, f"{p} {peers.peer_version(p) or '?'}") for p in impl_peers]
    plan = [
        (dim, batch, impl, precision)
        for dim in dims
        for batch in sorted(batch_sizes)
        for impl, _ in impls
        for precision in precisions
    ]
    results: dict[tuple, list[dict]] = {key: [] for key in plan}
    oomed: dict[tuple[str, str, int], int] = {}

    with tempfile.TemporaryDirectory(prefix="palmtree-bench-") as tmp:
        oracles = _Oracles(device, args, isolate, Path(tmp))
        for round_ in range(args.rounds):
            for key in plan:
                dim, batch, impl, precision = key
                oracle, oracle_file = oracles.get(batch, dim)
                case = Case(
                    impl=impl,
                    precision=precision,
                    batch=batch,
                    dim=dim,
                    device=kind,
                    repeats=repeats,
                    warmup=warmup,
                    seed=args.seed,
                    log_scale=args.logit_scale,
                    chunk_size=args.chunk_size,
                    oracle=oracle_file,
                    mem_limit_mb=args.mem_limit_mb,
                    threads=args.threads,
                )
                result = _run_one(case, device, isolate, oracle, oomed, args.case_timeout)
                if result["status"] == "oom":
                    oomed.setdefault((impl, precision, dim), batch)
                results[key].append(result)
                prefix = f"[{round_ + 1}/{args.rounds}] " if args.rounds > 1 else ""
                _print_case(prefix, case, result)

    versions = dict(impls)
    for key in plan:
        dim, batch, impl, precision = key
        row = dict(common, impl=impl, impl_version=versions[impl], precision=precision)
        row.update(batch=batch, dim=dim, **combine_rounds(results[key]))
        _append_row(csv_path, row)
    _report(csv_path, args.no_plot)
    return 0


class _Oracles:
    """The float64 oracle per ``(B, D)``, computed on first use and kept for later rounds
    (in memory, or in a file the worker processes read)."""

    def __init__(self, device, args, isolate: str, tmp: Path):
        self.device, self.args, self.isolate, self.tmp = device, args, isolate, tmp
        self.cache: dict[tuple[int, int], tuple[dict | None, str | None]] = {}

    def get(self, batch: int, dim: int) -> tuple[dict | None, str | None]:
        if self.args.no_check:
            return None, None
        if (batch, dim) not in self.cache:
            img, txt = make_inputs(batch, dim, self.args.seed, self.device)
            oracle = oracle_fp64(img, txt, self.args.logit_scale)
            del img, txt
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if self.isolate == "process":
                path = str(self.tmp / f"oracle-{batch}-{dim}.pt")
                torch.save(oracle, path)
                self.cache[batch, dim] = (None, path)
            else:
                self.cache[batch, dim] = (oracle, None)
        return self.cache[batch, dim]


def combine_rounds(results: list[dict]) -> dict:
    """One row from a case's rounds: timed runs pooled (median, min), worst memory and error."""
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        return dict(results[0], repeats=0)
    times = [t for r in ok for t in r["times"]]
    out = dict(ok[0])
    out.update(
        repeats=len(times),
        median_ms=statistics.median(times),
        min_ms=min(times),
        peak_mb=max(r["peak_mb"] for r in ok),
    )
    for k in ("loss_diff", "grad_diff"):
        values = [r[k] for r in ok if r.get(k) is not None]
        out[k] = max(values) if values else None
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        out["note"] = f"{len(failed)} of {len(results)} rounds failed, first: " + (
            f"{failed[0]['status']}: {failed[0].get('note', '')}"
        )
    return out


def _run_one(case: Case, device, isolate, oracle, oomed, timeout) -> dict:
    why = skip_reason(case.impl, case.precision, device)
    if why is not None:
        return dict(status="skip", note=why)
    smaller = oomed.get((case.impl, case.precision, case.dim))
    if smaller is not None and case.batch > smaller:
        return dict(status="oom", note=f"not run: out of memory at B={smaller} already")
    if isolate == "process":
        return run_case_in_process(case, timeout)
    try:
        return run_case(case, oracle)
    except Exception as exc:
        return dict(status="error", note=_one_line(exc))
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _print_case(prefix: str, case: Case, row: dict) -> None:
    what = f"{prefix}{case.impl:>10} {case.precision:<5} B={case.batch:<7} D={case.dim:<5}"
    if row["status"] != "ok":
        print(f"{what} {row['status']}: {row.get('note', '')}", flush=True)
        return
    diff = ""
    if row.get("loss_diff") is not None:
        diff = f", loss diff {row['loss_diff']:.1e}, grad diff {row['grad_diff']:.1e}"
    ms, mb, loss = row["median_ms"], row["peak_mb"], row["loss"]
    print(f"{what} {ms:10.2f} ms {mb:10.1f} MB  loss {loss:.4f}{diff}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
