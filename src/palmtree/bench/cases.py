"""What ``palmtree bench`` measures: one case, the default grid, the inputs, why a case
cannot run here, and the loss callable of each implementation and precision.

A case is one forward+backward of one loss (``clip``: the bidirectional softmax loss;
``siglip``: the pairwise sigmoid loss) by one implementation (a palmtree backend or a
peer) in one operand precision, on a global batch of ``batch`` pairs of width ``dim``,
in one process.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import clip_loss, siglip_loss, testing
from ..backends import BACKENDS, CONCRETE_BACKENDS, fused_can_run, get_kernels
from . import compiled, peers
from .targets import NEGATIVES_SEED, NO_TARGETS, TargetSpec
from .targets import skip_reason as targets_skip_reason

#: What ``--backends`` may name: palmtree's backends, and the chunked one compiled.
BENCH_BACKENDS = (*CONCRETE_BACKENDS, compiled.COMPILED)

#: Sizes, precisions, timed runs and warm-up runs when the command line names none, per
#: device type (``--help`` shows them all).
DEFAULTS = {
    "cpu": dict(
        batch_sizes=[1024, 2048, 4096, 8192], dims=[512], precisions=["ieee"], repeats=5, warmup=1
    ),
    "cuda": dict(
        batch_sizes=[8192, 32768, 65536, 131072],
        dims=[512],
        precisions=["ieee", "tf32", "bf16"],
        repeats=5,
        warmup=2,
    ),
}
#: What ``--quick`` changes in them (tiny sizes, for tests).
QUICK = dict(batch_sizes=[64, 128], dims=[32], repeats=1, warmup=1)
#: Text = image direction + this much independent noise (``testing.make_pairs``'s
#: "correlated" pairs): a positive pair's cosine is ~0.55, and with the default
#: temperature and D=512 the loss is ~0.4 at B=1024 and ~3 at B=131072, far from both a
#: trivial batch (0) and an uncorrelated one (log B).
NOISE = 1.5
LOG_SCALE = math.log(1 / 0.07)
SCALE_CAP = 100.0
#: SigLIP's initial log-temperature and bias (Zhai et al. 2023), the sigmoid cases' inputs.
SIGLIP_LOG_SCALE = math.log(10.0)
SIGLIP_BIAS = -10.0


def impl_label(impl: str, loss: str, targets: TargetSpec = NO_TARGETS) -> str:
    """The name of what a row measured: ``chunked`` (CLIP), ``siglip:chunked``, and with
    labels or extra negatives their suffix, ``chunked[labels=10]``
    (:meth:`~palmtree.bench.targets.TargetSpec.tag`).

    The CSV's ``impl`` column carries the loss and the targets this way, so that its
    columns stay those of every CSV written before (no column to add, none to migrate)
    and every CLIP row without targets is what it always was.
    """
    return (impl if loss == "clip" else f"{loss}:{impl}") + targets.tag()


def split_label(label: str) -> tuple[str, str]:
    """``(loss, impl)`` of a row's ``impl`` column (:func:`impl_label`'s inverse)."""
    loss, sep, impl = label.partition(":")
    return (loss, impl) if sep else ("clip", label)


@dataclass(frozen=True)
class Case:
    """One measurement; JSON-serialisable, so that a worker process can run it."""

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
    oracle: str | None = None  # file holding the float64 truth (process isolation)
    mem_limit_mb: int | None = None
    threads: int | None = None  # CPU threads (torch.set_num_threads)
    loss: str = "clip"  # one of palmtree.options.LOSSES
    logit_bias: float = SIGLIP_BIAS  # siglip only
    labels: int = 0  # K: pair i's item is i % K; 0: no labels
    same_label: str = "positive"
    negatives: float = 0.0  # R: round(R * batch) extra negative text columns

    @property
    def targets(self) -> TargetSpec:
        return TargetSpec(self.labels, self.same_label, self.negatives)


def make_inputs(batch: int, dim: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The benchmark's (image, text) features: ``testing.make_pairs`` with ``NOISE``, fp32.

    Drawn on the CPU from a seeded generator and then moved, so every process and every
    device sees the same values for the same ``(batch, dim, seed)``.
    """
    img, txt = testing.make_pairs(batch, dim, seed, kind="correlated", noise=NOISE)
    return img.to(device), txt.to(device)


def make_targets(spec: TargetSpec, batch: int, dim: int, seed: int, device) -> dict:
    """The loss's keyword arguments for ``spec``: ``labels`` (``[batch]`` int64, pair
    ``i``'s id ``i % K``) and ``text_negatives`` (``[round(R * batch), dim]`` fp32, the
    texts of ``testing.make_pairs`` at seed ``seed + NEGATIVES_SEED``, no gradient yet),
    each only where ``spec`` asks for it; drawn as :func:`make_inputs` draws the pairs."""
    extras = {}
    if spec.labels:
        extras["labels"] = (torch.arange(batch) % spec.labels).to(device)
    if spec.negatives:
        n = spec.n_negatives(batch)
        _, neg = testing.make_pairs(n, dim, seed + NEGATIVES_SEED, noise=NOISE)
        extras["text_negatives"] = neg.to(device)
    return extras


def skip_reason(
    impl: str,
    precision: str,
    device: torch.device,
    loss: str = "clip",
    targets: TargetSpec = NO_TARGETS,
) -> str | None:
    """Why a case cannot run here, decided before it is started; ``None`` if it can.

    What the run's targets rule out comes first: it holds on every machine."""
    why = targets_skip_reason(impl, targets)
    if why is not None:
        return why
    if impl == compiled.COMPILED:
        return compiled.skip_reason(device)
    if impl in BACKENDS:
        if impl == "fused" and not fused_can_run(device):
            return f"fused needs CUDA and Triton (device is {device.type})"
        return None
    why = peers.peer_status(impl, device, loss)
    if why is not None:
        return why
    if impl == "inf_cl" and precision != "tf32":
        return "Inf-CL computes in TF32 only (run it with --precisions tf32)"
    if impl == "open_clip" and precision == "tf32" and device.type != "cuda":
        return "no TF32 on a CPU"
    return None


@contextlib.contextmanager
def case_context(case: Case, device: torch.device):
    """What a case runs inside: the peers' precision mode, and Inf-CL's process group.

    Peers have no precision argument: ``bf16`` runs them under bf16 autocast and
    ``tf32`` with ``allow_tf32`` on CUDA. Inf-CL's temperature gradient all-reduces even
    on one process, so it gets a world-size-1 group.
    """
    with contextlib.ExitStack() as stack:
        if case.impl == "inf_cl":
            stack.enter_context(peers.single_rank_group(device))
        if case.impl in peers.PEERS and case.precision == "bf16":
            stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        elif device.type == "cuda":
            stack.enter_context(_Tf32(case.precision == "tf32"))
        yield


class _Tf32:
    """Sets ``torch.backends.cuda.matmul.allow_tf32`` for the duration."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.enabled

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.old


def scalar_leaves(case: Case, device: torch.device) -> list[torch.Tensor]:
    """The loss's scalar inputs, as leaves that collect gradients: the log-temperature,
    and for ``siglip`` the bias. Their gradients are named ``SCALAR_GRADS[case.loss]``."""
    values = [case.log_scale] + ([case.logit_bias] if case.loss == "siglip" else [])
    return [torch.tensor(x, device=device, requires_grad=True) for x in values]


#: The names of the gradients of :func:`scalar_leaves`, per loss.
SCALAR_GRADS = {"clip": ("d_scale",), "siglip": ("d_scale", "d_bias")}

#: ``loss(img, txt, *scalar_leaves, **make_targets(...))``: the scalar loss to backpropagate.
LossFn = Callable[..., torch.Tensor]


def loss_fn(case: Case) -> LossFn:
    """``loss(img, txt, *scalars, **extras)`` of ``case.impl`` for ``case.loss``, its imports
    done now (not timed); ``scalars`` are :func:`scalar_leaves`, ``extras`` the keywords of
    :func:`make_targets` (palmtree's backends only: the peers take none, and are skipped
    when a run has targets). ``chunked+compile`` is chunked's loss handed to
    :func:`~palmtree.bench.compiled.compile_loss` (compiled on first call)."""
    if case.impl == compiled.COMPILED:
        return compiled.compile_loss(_palmtree_loss(case, "chunked"))
    if case.impl in BACKENDS:
        return _palmtree_loss(case, case.impl)
    if case.impl == "open_clip":
        peers.load_open_clip_loss_module()
        return peers.open_clip_siglip_loss if case.loss == "siglip" else peers.open_clip_loss
    if case.impl == "inf_cl":
        peers.load_inf_cl()
        return peers.inf_cl_loss
    raise ValueError(f"unknown impl {case.impl!r}")


def _palmtree_loss(case: Case, backend: str) -> LossFn:
    if backend in ("chunked", "fused"):
        get_kernels(backend)  # import now, not inside the measured region
    options = dict(
        backend=backend,
        precision=case.precision,
        chunk_size=case.chunk_size,
        logit_scale_max=SCALE_CAP,
    )
    if case.labels:
        options["same_label"] = case.same_label
    if case.loss == "siglip":
        return lambda img, txt, *scalars, **extras: (
            siglip_loss(img, txt, *scalars, **extras, **options).loss
        )
    return lambda img, txt, log_scale, **extras: (
        clip_loss(img, txt, log_scale, **extras, **options).loss
    )
