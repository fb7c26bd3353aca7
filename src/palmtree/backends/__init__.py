"""Backends behind :func:`palmtree.clip_loss`.

``reference``: materialised logits, autograd; the readable oracle.
``chunked``:   single pass over column chunks, pure PyTorch, CPU and CUDA.
``fused``:     single pass in Triton kernels, CUDA (or the Triton interpreter).
``auto``:      ``chunked``, and ``fused`` on the CUDA cards listed in
               :data:`FUSED_BY_DEFAULT`, falling back to ``chunked`` (with one warning
               that quotes the error) if Triton fails to compile or launch there.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

#: What the losses run: every backend but ``auto``, which picks one of them.
CONCRETE_BACKENDS = ("reference", "chunked", "fused")
#: The ``backend`` option's values.
BACKENDS = ("auto", *CONCRETE_BACKENDS)

#: CUDA device names (``torch.cuda.get_device_name()``) on which ``auto`` picks ``fused``:
#: the cards where a committed run of ``benchmarks/gpu_check.sh`` showed the fused kernels
#: correct and faster than ``chunked`` (docs/benchmarks.md). None has run them yet, so
#: ``auto`` is ``chunked`` everywhere and ``backend="fused"`` stays one argument away.
FUSED_BY_DEFAULT: tuple[str, ...] = ()


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def fused_can_run(device: torch.device) -> bool:
    """Fused kernels run on CUDA, or anywhere under ``TRITON_INTERPRET=1``."""
    if not triton_available():
        return False
    return device.type == "cuda" or interpreting()


def _fused_by_default(device: torch.device) -> bool:
    if device.type != "cuda" or not fused_can_run(device):
        return False
    return torch.cuda.get_device_name(device) in FUSED_BY_DEFAULT


def backend_name_problem(name) -> str | None:
    """Why ``name`` is no ``backend`` option (``None`` if it is one)."""
    if name in BACKENDS:
        return None
    return f"backend must be one of {BACKENDS}, got {name!r}"


def backend_problem(name, device: torch.device) -> str | None:
    """Why ``backend=name`` cannot run on ``device`` (``None`` if it can)."""
    problem = backend_name_problem(name)
    if problem is not None:
        return problem
    if name == "fused" and not fused_can_run(device):
        why = "Triton is not installed" if not triton_available() else f"tensors are on {device}"
        return (
            f"backend='fused' cannot run here ({why}); it needs CUDA and Triton "
            "(or TRITON_INTERPRET=1 for testing). Use backend='chunked' or 'auto'."
        )
    return None


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend that runs: ``auto`` resolved, a backend that cannot run refused."""
    problem = backend_problem(name, device)
    if problem is not None:
        raise ValueError(problem)
    if name == "auto":
        return "fused" if _fused_by_default(device) else "chunked"
    return name


def get_kernels(name: str, *, fallback: bool = False):
    """The single-pass kernels of ``name``; ``fallback`` wraps ``fused`` so that a Triton
    failure runs ``chunked`` instead (what ``auto`` asks for)."""
    if name == "chunked":
        from .chunked import ChunkedKernels

        return ChunkedKernels()
    if name == "fused":
        from .fused import FusedKernels

        return FusedOrChunked(FusedKernels()) if fallback else FusedKernels()
    raise ValueError(f"{name!r} has no single-pass kernels")


class FusedOrChunked:
    """Fused kernels that fall back to chunked ones, process-wide, once Triton fails
    (both losses' methods: :class:`.base.Kernels` and :class:`.base.SigmoidKernels`).

    The two backends issue the same collectives (the protocol does them, not the
    kernels), so a rank that falls back stays in step with the others.
    """

    name = "fused"
    failure: str | None = None  # the first failure's message, shared by every instance

    def __init__(self, fused):
        from .chunked import ChunkedKernels

        self.fused, self.chunked = fused, ChunkedKernels()

    def forward(self, *args, **kwargs):
        return self._call("forward", *args, **kwargs)

    def backward(self, *args, **kwargs):
        return self._call("backward", *args, **kwargs)

    def sigmoid_forward(self, *args):
        return self._call("sigmoid_forward", *args)

    def sigmoid_backward(self, *args):
        return self._call("sigmoid_backward", *args)

    def _call(self, method: str, *args, **kwargs):
        if FusedOrChunked.failure is None:
            try:
                return getattr(self.fused, method)(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # Triton's compile and launch errors have no common base
                FusedOrChunked.failure = f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    "backend='auto' chose the fused kernels but Triton failed "
                    f"({FusedOrChunked.failure}); using backend='chunked' from now on",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return getattr(self.chunked, method)(*args, **kwargs)
