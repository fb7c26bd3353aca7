"""The rooms of ``benchmarks/compile_audit.py``, the entry point (its docstring says what
the audit does), from the ground up: ``targets`` (the cards, the widths, the open
findings), ``toolchain`` (Triton's compile API and the NVIDIA tools), ``record`` (the
fused backend's launches, recorded instead of run), ``compiling`` (each launch compiled
and judged) and ``report`` (the markdown that docs/kernels.md keeps). Each imports only
the standard library at its top, and Triton, PyTorch and palmtree where it needs them.
"""
