"""Backends behind :func:`palmtree.clip_loss`.

``reference``: materialised logits, autograd; the readable oracle.
``chunked``:   single pass over column chunks, pure PyTorch, CPU and CUDA.
``fused``:     single pass in Triton kernels, CUDA (or the Triton interpreter).
``auto``:      ``fused`` on CUDA when Triton imports, ``chunked`` elsewhere.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "chunked", "fused")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def fused_can_run(device: torch.device) -> bool:
    """Fused kernels run on CUDA, or anywhere under ``TRITON_INTERPRET=1``."""
    if not triton_available():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(name: str, device: torch.device) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "fused" if device.type == "cuda" and fused_can_run(device) else "chunked"
    if name == "fused" and not fused_can_run(device):
        why = "Triton is not installed" if not triton_available() else f"tensors are on {device}"
        raise RuntimeError(
            f"backend='fused' cannot run here ({why}); it needs CUDA and Triton "
            "(or TRITON_INTERPRET=1 for testing). Use backend='chunked' or 'auto'."
        )
    return name


def get_kernels(name: str):
    if name == "chunked":
        from .chunked import ChunkedKernels

        return ChunkedKernels()
    if name == "fused":
        from .fused import FusedKernels

        return FusedKernels()
    raise ValueError(f"{name!r} has no single-pass kernels")
