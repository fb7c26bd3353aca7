"""Triton's ahead-of-time compile API and the tools of its NVIDIA backend, or
:class:`Unavailable` saying why this Triton cannot compile for a named card."""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path


class Unavailable(RuntimeError):
    """This Triton cannot compile for a named target (too old, no NVIDIA backend)."""


def triton_api():
    """``(triton, ASTSource, GPUTarget, JITFunction)``; :class:`Unavailable` says why not."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise Unavailable("TRITON_INTERPRET=1: the interpreter compiles nothing; unset it")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction
    except ImportError as exc:
        raise Unavailable(f"this Triton has no ahead-of-time compile API: {exc}") from exc
    try:
        inspect.signature(ASTSource).bind(None, {}, {}, {})
        inspect.signature(GPUTarget).bind("cuda", 90, 32)
        inspect.signature(JITFunction.run).bind(None, grid=None, warmup=False)
        inspect.signature(triton.compile).bind(None, target=None, options={})
    except TypeError as exc:
        raise Unavailable(f"Triton {triton.__version__}: the compile API differs: {exc}") from exc
    try:
        importlib.import_module("triton.backends.nvidia.compiler")
    except ImportError as exc:
        raise Unavailable(f"Triton {triton.__version__} has no NVIDIA backend: {exc}") from exc
    return triton, ASTSource, GPUTarget, JITFunction


def nvidia_tool(name: str) -> str:
    """A tool shipped with Triton's NVIDIA backend (``TRITON_<NAME>_PATH`` wins)."""
    import triton.backends.nvidia as nvidia

    for path in (
        os.environ.get(f"TRITON_{name.upper()}_PATH"),
        str(Path(nvidia.__file__).parent / "bin" / name),
    ):
        if path and os.access(path, os.X_OK):
            return path
    raise Unavailable(f"no {name} in Triton's NVIDIA backend (bin/{name})")
