"""``palmtree verify``: check the distributed loss on this machine against float64.

Two ways to run it::

    palmtree verify --nproc 3                      # 3 local ranks, gloo on CPU
    torchrun --nproc-per-node 8 -m palmtree verify  # the launched world (NCCL on GPUs)

Every rank regenerates the same seeded global batch (realistic, unnormalised pairs) and
takes its slice of an uneven split (rank 1 holds nothing when there are 3 or more
ranks). For each backend, matmul precision and temperature, the ranks run
:func:`palmtree.clip_loss` and its backward, then compare with the float64 loss and
gradients of one process on the whole batch:

* ``loss``: each rank's returned value (``N * share_r``) and the all-reduced global loss;
* ``d_image``, ``d_text``: each rank's feature gradients (``N * dL/dx_r``, what a rank
  holds before DDP's average);
* ``d_scale``: the mean over ranks of the temperature's gradient (what DDP applies).

A row's errors are ``max |ours - float64| / max |float64|`` over all ranks. What a
precision can achieve sets its tolerance: a row passes when every error is at most
twice that of a plain single-process float32 PyTorch computation whose matmuls (forward
and backward) round their operands as the mode does (TF32 or bf16 operands, fp32
accumulation), plus ``1e-6`` relative (and ``2 * eps32 * scale`` for the loss, which
cannot be more exact than one logit). ``worst`` is the largest error/tolerance ratio.

Exit status: 0 when every row passes, 1 on a failed row, a rank that raised, or a
timeout (the message names the ranks), 2 on bad arguments. ``--json`` prints one JSON
object instead of the table.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import math
import os
import queue as queue_lib
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import timedelta

from .distributed import free_port, launched_world

PRECISIONS = ("ieee", "tf32", "bf16")
BACKENDS = ("reference", "chunked", "fused")
DEFAULT_SCALES = (1 / 0.07, 99.0)
FAULTS = ("raise", "hang", "wrong")
QUANTITIES = ("loss", "d_image", "d_text", "d_scale")
_EPS32 = 2.0**-23
#: How long the other ranks get to report once one rank has failed.
_GRACE_S = 5.0


@dataclass
class Options:
    nproc: int | None = None  # None: 2 spawned ranks (ignored under torchrun)
    backends: tuple[str, ...] | None = None
    precisions: tuple[str, ...] = PRECISIONS
    scales: tuple[float, ...] = DEFAULT_SCALES
    batch: int = 389
    dim: int = 72
    seed: int = 0
    chunk_size: int | None = None
    timeout: float = 120.0
    json: bool = False
    fault: tuple[str, int] | None = None


@dataclass
class Row:
    backend: str
    precision: str
    logit_scale: float
    errors: dict[str, float | None] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=dict)
    worst: float | None = None
    passed: bool = False


# --------------------------------------------------------------------------- arguments


def _csv(kind: str, allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{kind} must be a comma-separated subset of {','.join(allowed)}, got {text!r}"
            )
        return items

    return parse


def _scales(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or any(not (0 < v <= 100) for v in values):
        raise argparse.ArgumentTypeError(f"scales must be numbers in (0, 100], got {text!r}")
    return values


def _fault(text: str) -> tuple[str, int]:
    kind, _, rank = text.partition(":")
    if kind not in FAULTS or not rank.isdigit():
        raise argparse.ArgumentTypeError(f"expected one of {FAULTS}:RANK, got {text!r}")
    return kind, int(rank)


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def parse_args(argv: list[str]) -> Options:
    p = argparse.ArgumentParser(
        prog="palmtree verify",
        description=(
            "Check palmtree's distributed CLIP loss and its gradients against a float64 "
            "single-process reference, for every backend and precision that runs here. "
            "Spawns --nproc local gloo ranks, or uses the world torchrun launched."
        ),
    )
    p.add_argument("--nproc", type=_positive(int), default=None, help="local ranks to spawn (2)")
    p.add_argument(
        "--backends",
        type=_csv("backends", BACKENDS),
        default=None,
        help="comma-separated (default: reference,chunked and fused where CUDA and Triton are)",
    )
    p.add_argument(
        "--precisions",
        type=_csv("precisions", PRECISIONS),
        default=PRECISIONS,
        help="comma-separated matmul operand precisions (default: ieee,tf32,bf16)",
    )
    p.add_argument(
        "--scales",
        type=_scales,
        default=DEFAULT_SCALES,
        help="comma-separated temperatures exp(logit_scale) (default: 14.29,99)",
    )
    p.add_argument("--batch", type=_positive(int), default=389, help="global batch (389)")
    p.add_argument("--dim", type=_positive(int), default=72, help="feature dim (72)")
    p.add_argument("--seed", type=int, default=0, help="data seed (0)")
    p.add_argument("--chunk-size", type=_positive(int), default=None, help="chunked backend")
    p.add_argument(
        "--timeout",
        type=_positive(float),
        default=120.0,
        help="seconds before a stuck run is ended, naming the ranks that did not finish (120)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object, not a table")
    # For the tests of this command: make one rank raise, hang or return a wrong gradient.
    p.add_argument(
        "--inject-fault", dest="fault", type=_fault, default=None, help=argparse.SUPPRESS
    )
    ns = p.parse_args(argv)
    return Options(**vars(ns))


# --------------------------------------------------------------------------- data and reference


def split_sizes(big: int, n: int) -> list[int]:
    """An uneven split of ``big`` pairs over ``n`` ranks; rank 1 is empty when ``n >= 3``.

    Rank ``r`` gets a share proportional to ``r + 2``, so every size differs.
    """
    weights = [0 if (n >= 3 and r == 1) else r + 2 for r in range(n)]
    total = sum(weights)
    sizes = [big * w // total for w in weights]
    r = n - 1
    while sum(sizes) < big:  # the remainder goes to the largest ranks
        if weights[r]:
            sizes[r] += 1
        r = (r - 1) % n
    return sizes


def make_batch(big: int, dim: int, seed: int):
    """Correlated (image, text) pairs, float64 on CPU, with a spread of norms.

    The texts are noisy enough (positive cosine about 0.45) that the loss stays of order
    one, as in training, at both the initial temperature and the cap.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(big, dim, generator=g, dtype=torch.float64)
    img = base * (1 + torch.rand(big, 1, generator=g, dtype=torch.float64))
    txt = base + 2.0 * torch.randn(big, dim, generator=g, dtype=torch.float64)
    return img, txt


def _plain_mm(a, b, precision: str):
    """``a @ b`` as a plain PyTorch matmul in ``precision`` does it, fp32 accumulation."""
    import torch

    from .precision import cast_operand, mm

    if a.dtype == torch.float64:
        return a @ b
    return mm(cast_operand(a, precision), cast_operand(b, precision), precision)


def _rounded_matmul():
    import torch

    class RoundedMatmul(torch.autograd.Function):
        """A matmul whose forward and backward products both run in ``precision``."""

        @staticmethod
        def forward(ctx, a, b, precision):
            ctx.save_for_backward(a, b)
            ctx.precision = precision
            return _plain_mm(a, b, precision)

        @staticmethod
        def backward(ctx, grad):
            a, b = ctx.saved_tensors
            p = ctx.precision
            return _plain_mm(grad, b.T, p), _plain_mm(a.T, grad, p), None

    return RoundedMatmul


def reference(img, txt, log_scale: float, sizes, precision: str, dtype, device) -> dict:
    """The single-process loss on the whole batch, plainly, in ``dtype`` and ``precision``.

    Returns the global loss, the per-rank shares (summing to it) and the gradients of
    the global loss with respect to the features and the log-scale.
    """
    import torch
    import torch.nn.functional as F

    i = img.to(device=device, dtype=dtype, copy=True).requires_grad_()
    t = txt.to(device=device, dtype=dtype, copy=True).requires_grad_()
    theta = torch.tensor(log_scale, dtype=dtype, device=device, requires_grad=True)
    u = F.normalize(i, dim=-1, eps=1e-6)
    v = F.normalize(t, dim=-1, eps=1e-6)
    scale = theta.exp().clamp(max=100.0)
    logits = scale * _rounded_matmul().apply(u, v.T, precision)
    labels = torch.arange(len(u), device=device)
    terms = F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(
        logits.T, labels, reduction="none"
    )
    shares = torch.stack([part.sum() for part in terms.split(list(sizes))]) / (2 * len(u))
    loss = shares.sum()
    loss.backward()
    return {
        "loss": loss.detach(),
        "shares": shares.detach(),
        "d_image": i.grad,
        "d_text": t.grad,
        "d_scale": theta.grad,
    }


def _max_abs(x) -> float:
    if x.numel() == 0:
        return 0.0
    value = float(x.double().abs().max())
    return value if math.isfinite(value) else math.inf


# --------------------------------------------------------------------------- the checks


def default_backends(device) -> tuple[str, ...]:
    from .backends import fused_can_run

    extra = ("fused",) if device.type == "cuda" and fused_can_run(device) else ()
    return ("reference", "chunked", *extra)


def backend_problem(backends, device) -> str | None:
    from .backends import fused_can_run, triton_available

    if backends and "fused" in backends and not fused_can_run(device):
        why = "Triton is not installed" if not triton_available() else f"the ranks run on {device}"
        return (
            f"backend 'fused' cannot run here ({why}); it needs CUDA and Triton, e.g. under "
            "torchrun on GPUs (or TRITON_INTERPRET=1 for a slow CPU check)"
        )
    return None


def run_checks(rank: int, n: int, device, opts: Options, progress=lambda step: None) -> list[Row]:
    """Every rank of the world calls this; each returns the same rows (errors all-reduced)."""
    import torch

    backends = opts.backends or default_backends(device)
    sizes = split_sizes(opts.batch, n)
    img, txt = make_batch(opts.batch, opts.dim, opts.seed)
    fault = opts.fault[0] if opts.fault and opts.fault[1] == rank else None

    rows = []
    old_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the plain fp32 products stay fp32
    try:
        for scale in opts.scales:
            progress(f"float64 reference, scale {scale:.4g}")
            exact = reference(img, txt, math.log(scale), sizes, "ieee", torch.float64, device)
            for precision in opts.precisions:
                progress(f"plain float32 {precision} computation, scale {scale:.4g}")
                naive = reference(
                    img, txt, math.log(scale), sizes, precision, torch.float32, device
                )
                for backend in backends:
                    step = f"{backend}/{precision}/scale {scale:.4g}"
                    progress(step)
                    if fault == "raise":
                        raise RuntimeError(f"injected fault on rank {rank} at {step}")
                    if fault == "hang":
                        time.sleep(1e6)
                    errors = _distributed_errors(
                        img, txt, scale, sizes, rank, device, backend, precision, opts, exact,
                        wrong=fault == "wrong",
                    )  # fmt: skip
                    rows.append(_row(backend, precision, scale, errors, exact, naive, n))
    finally:
        torch.set_float32_matmul_precision(old_precision)
    return rows


def _distributed_errors(
    img, txt, scale, sizes, rank, device, backend, precision, opts, exact, wrong=False
) -> list[float]:
    """This rank's slice through :func:`palmtree.clip_loss` and backward, against float64.

    Returns the absolute errors, reduced over ranks: of the per-rank losses, of the
    global loss, of the image and text gradients, and of the mean scale gradient.
    """
    import torch
    import torch.distributed as dist

    import palmtree

    n = len(sizes)
    o, b = sum(sizes[:rank]), sizes[rank]
    i = img[o : o + b].to(device, torch.float32, copy=True).requires_grad_()
    t = txt[o : o + b].to(device, torch.float32, copy=True).requires_grad_()
    theta = torch.tensor(math.log(scale), device=device, requires_grad=True)
    out = palmtree.clip_loss(
        i, t, theta, backend=backend, precision=precision, chunk_size=opts.chunk_size
    )
    out.loss.backward()
    d_image = i.grad * 1.25 if wrong else i.grad  # --inject-fault wrong: must be caught
    worst = torch.tensor(
        [
            _max_abs(out.loss.detach() - n * exact["shares"][rank]),
            _max_abs(out.loss_global - exact["loss"]),
            _max_abs(d_image - n * exact["d_image"][o : o + b]),
            _max_abs(t.grad - n * exact["d_text"][o : o + b]),
        ],
        dtype=torch.float64,
        device=device,
    )
    d_scale = theta.grad.detach().double().reshape(1)
    if dist.is_available() and dist.is_initialized() and n > 1:
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        dist.all_reduce(d_scale)  # DDP applies the mean over ranks
    return [*worst.tolist(), abs(float(d_scale) / n - float(exact["d_scale"]))]


def _row(backend, precision, scale, errors, exact, naive, n) -> Row:
    """Errors against float64 and the tolerance each quantity's plain computation earns."""
    loss_rank, loss_global, d_image, d_text, d_scale = errors
    loss_atol = 2 * _EPS32 * min(scale, 100.0)  # a loss is no more exact than one logit
    ours = {
        "loss": (loss_rank, loss_global),
        "d_image": (d_image,),
        "d_text": (d_text,),
        "d_scale": (d_scale,),
    }
    truth = {
        "loss": (n * exact["shares"], exact["loss"]),
        "d_image": (n * exact["d_image"],),
        "d_text": (n * exact["d_text"],),
        "d_scale": (exact["d_scale"],),
    }
    plain = {
        "loss": (n * naive["shares"], naive["loss"]),
        "d_image": (n * naive["d_image"],),
        "d_text": (n * naive["d_text"],),
        "d_scale": (naive["d_scale"],),
    }
    row = Row(backend, precision, scale)
    ratios = []
    for q in QUANTITIES:
        rel_errs, rel_tols = [], []
        for err, want, got_plain in zip(ours[q], truth[q], plain[q], strict=True):
            size = _max_abs(want)
            plain_err = _max_abs(got_plain.double() - want.double())
            tol = 2 * plain_err + 1e-6 * size + (loss_atol if q == "loss" else 0.0)
            ratios.append(err / tol if tol > 0 else (0.0 if err == 0 else math.inf))
            rel_errs.append(err / size if size else err)
            rel_tols.append(tol / size if size else tol)
        worst = max(rel_errs)
        row.errors[q] = worst if math.isfinite(worst) else None
        row.tolerances[q] = max(rel_tols)
    worst_ratio = max(ratios)
    row.worst = worst_ratio if math.isfinite(worst_ratio) else None
    row.passed = row.worst is not None and row.worst <= 1.0
    return row


# --------------------------------------------------------------------------- running ranks


def _spawned_rank(rank: int, n: int, port: int, opts: Options, results, stack_file) -> None:
    """Entry point of a spawned rank: gloo on loopback, results and progress to the parent."""
    try:
        import torch
        import torch.distributed as dist

        if stack_file is not None:  # the parent asks for our stack if we get stuck
            faulthandler.register(signal.SIGUSR1, file=open(stack_file, "w"), all_threads=True)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
        results.put(("progress", rank, "joining the process group"))
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=n,
            timeout=timedelta(seconds=opts.timeout),
        )

        def progress(step):
            results.put(("progress", rank, step))

        rows = run_checks(rank, n, torch.device("cpu"), opts, progress)
        # The parent stops waiting at "done" and ends the process if tearing down stalls.
        results.put(("done", rank, [asdict(r) for r in rows] if rank == 0 else None))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as exc:  # report it; the parent decides what the others do
        results.put(("error", rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        results.close()
        results.join_thread()
        os._exit(1)


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


@dataclass
class Outcome:
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
        stack_files = (
            [os.path.join(tmp, f"rank{r}.stack") for r in range(n)]
            if hasattr(signal, "SIGUSR1")
            else None
        )
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
            return _collect(opts, procs, results, stack_files)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=5)


def _collect(opts: Options, procs, results, stack_files) -> Outcome:
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
            deadline = min(deadline, time.monotonic() + _GRACE_S)

    if errors:
        first = next(iter(errors))  # the first to report; the others often follow from it
        lines = [f"rank {first} failed: {errors[first].rstrip()}"]
        lines += [
            f"rank {r} failed too: {errors[r].splitlines()[0]}"
            for r in sorted(errors)
            if r != first
        ]
        stopped = [r for r in range(n) if r not in done and r not in errors]
        if stopped:
            lines.append(f"rank(s) {_ranks(stopped)} stopped (waiting on the failed rank?)")
        return Outcome(error="\n".join(lines))
    if len(done) < n:
        stuck = [r for r in range(n) if r not in done]
        frames = _where_stuck(procs, stack_files, stuck)
        lines = [f"timed out after {opts.timeout:g} s: rank(s) {_ranks(stuck)} did not finish"]
        lines += [f"  rank {r} [{last_step[r]}] {frames.get(r, '')}".rstrip() for r in stuck]
        return Outcome(error="\n".join(lines))
    return Outcome(rows=done[0])


def _ranks(ranks) -> str:
    return ", ".join(map(str, ranks))


def check_in_launched_world(opts: Options) -> tuple[Outcome, int, str]:
    """Runs in a torchrun-launched rank; a watchdog ends this rank at the timeout."""
    import torch
    import torch.distributed as dist

    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    step = ["joining the process group"]

    def expire():
        print(
            f"palmtree verify: timed out after {opts.timeout:g} s: rank {rank} did not finish "
            f"(at: {step[0]})",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    watchdog = threading.Timer(opts.timeout, expire)
    watchdog.daemon = True
    watchdog.start()
    where = f"{backend}, {device}, launched"
    try:
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(seconds=opts.timeout))
        try:
            rows = run_checks(rank, n, device, opts, lambda s: step.__setitem__(0, s))
        except Exception as exc:
            return (
                Outcome(
                    error=f"rank {rank} failed: {type(exc).__name__}: {exc}\n"
                    f"{traceback.format_exc()}"
                ),
                rank,
                where,
            )
        step[0] = "shutting down the process group"
        dist.barrier()
        dist.destroy_process_group()
        return Outcome(rows=[asdict(r) for r in rows]), rank, where
    finally:
        watchdog.cancel()


# --------------------------------------------------------------------------- report


def _fmt(x) -> str:
    return "nan/inf" if x is None else f"{x:.1e}"


def render(rows: list[dict], header: str) -> str:
    cols = ["backend", "precision", "scale", *QUANTITIES, "worst", "result"]
    table = [cols]
    for r in rows:
        table.append(
            [
                r["backend"],
                r["precision"],
                f"{r['logit_scale']:.4g}",
                *(_fmt(r["errors"][q]) for q in QUANTITIES),
                "-" if r["worst"] is None else f"{r['worst']:.2f}",
                "PASS" if r["passed"] else "FAIL",
            ]
        )
    widths = [max(len(row[k]) for row in table) for k in range(len(cols))]
    lines = [header, ""]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    ]
    passed = sum(r["passed"] for r in rows)
    lines += [
        "",
        "errors: max |ours - float64| / max |float64| over all ranks; worst: the largest",
        "error / tolerance, where a quantity's tolerance is twice the error of a plain float32",
        "PyTorch computation with the same operand rounding, plus 1e-6 relative.",
        f"{passed} of {len(rows)} rows passed.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)

    import torch

    launched = launched_world()
    device = torch.device("cuda" if launched and torch.cuda.is_available() else "cpu")
    problem = backend_problem(opts.backends, device)
    if problem:
        if os.environ.get("RANK", "0") == "0":
            print(f"palmtree verify: {problem}", file=sys.stderr)
        return 2
    if launched:
        n = int(os.environ["WORLD_SIZE"])
        if opts.nproc not in (None, n) and os.environ["RANK"] == "0":
            print(f"palmtree verify: --nproc ignored, torchrun launched {n} ranks", file=sys.stderr)
        outcome, rank, where = check_in_launched_world(opts)
    else:
        opts.nproc = opts.nproc or 2
        rank, n, where = 0, opts.nproc, "gloo, cpu, spawned"
        outcome = spawn_and_check(opts)
    if rank != 0:
        if outcome.error:
            print(f"palmtree verify: {outcome.error}", file=sys.stderr)
        return 0 if outcome.rows and all(r["passed"] for r in outcome.rows) else 1

    sizes = split_sizes(opts.batch, n)
    ok = outcome.error is None and bool(outcome.rows) and all(r["passed"] for r in outcome.rows)
    if opts.json:
        report = {
            "ok": ok,
            "world_size": n,
            "where": where,
            "sizes": sizes,
            "dim": opts.dim,
            "seed": opts.seed,
            "rows": outcome.rows or [],
            "error": outcome.error,
        }
        print(json.dumps(report, indent=2))
    else:
        header = (
            f"palmtree verify: {n} rank(s) ({where}), global batch {opts.batch} split "
            f"{sizes}, D={opts.dim}, seed {opts.seed}"
        )
        if outcome.rows:
            print(render(outcome.rows, header))
        if outcome.error:
            print(f"palmtree verify: {outcome.error}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
