"""Each recorded launch compiled for its target, its resources read back from the cubin,
and the row judged: :func:`audit` for the plans, :func:`calibrate` for the plans that
must fail."""

from __future__ import annotations

import importlib
import re
import subprocess
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .record import Launch, record_launches
from .targets import CALIBRATION, DIMS, KNOWN_SPILLS, TARGETS, Target
from .toolchain import nvidia_tool, triton_api

_RESOURCE = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")


def resources(cubin: bytes) -> dict[str, int]:
    """``REG``, ``STACK``, ``SHARED`` (static) and ``LOCAL`` of the kernel in ``cubin``,
    from ``cuobjdump --dump-resource-usage``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run(
            [nvidia_tool("cuobjdump"), "--dump-resource-usage", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    found = {k: int(v) for k, v in _RESOURCE.findall(out)}
    if set(found) != {"REG", "STACK", "SHARED", "LOCAL"}:
        raise RuntimeError(f"unexpected cuobjdump output:\n{out}")
    return found


def compile_one(request: tuple[Launch, str]) -> dict:
    """Compiles ``launch`` for the named target; its resources, or the compiler's error."""
    launch, target_name = request
    triton, ast_source, gpu_target, _ = triton_api()
    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    attrs = {(i,): hint for i, hint in launch.attrs.items()}
    source = ast_source(fn, launch.signature, launch.constexprs, attrs)
    target = gpu_target("cuda", TARGETS[target_name].arch, 32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. Triton 3.9's notice on FP fusion defaults
            compiled = triton.compile(source, target=target, options=dict(launch.options))
    except Exception as exc:  # a kernel that does not compile is a finding, not a crash
        lines = f"{type(exc).__name__}: {exc}".strip().splitlines()
        return dict(error=lines[0][:300])
    usage = resources(compiled.asm["cubin"])
    meta = compiled.metadata
    return dict(
        error=None,
        regs=usage["REG"],
        # Per-thread local memory: the stack frame, where ptxas spills registers, and
        # local arrays. A Triton kernel makes no calls, so either means spilling.
        spill=usage["STACK"] + usage["LOCAL"],
        shared=usage["SHARED"] + int(meta.shared),
        num_warps=int(meta.num_warps),
        num_stages=int(meta.num_stages),
    )


def occupancy(target: Target, regs: int, shared: int, warps: int) -> int:
    """Blocks per multiprocessor that registers, shared memory and warps allow (registers
    are allocated per warp in units of 256; each block reserves 1 KB of shared memory)."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = (target.regs_per_sm // regs_per_warp) // warps if regs else target.max_blocks_per_sm
    by_shared = target.shared_per_sm // (shared + 1024)
    return min(by_regs, by_shared, target.max_warps_per_sm // warps, target.max_blocks_per_sm)


def problems_of(row: dict) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` of one audited row: what fails the audit (it does not compile,
    spills where the plan promises it does not, or needs more shared memory than a block
    may have) and what is only reported (spills elsewhere)."""
    if row["error"]:
        return [f"does not compile: {row['error']}"], []
    target = TARGETS[row["target"]]
    problems, notes = [], []
    if row["spill"]:
        spill = f"spills: {row['spill']} bytes of local memory per thread"
        promised = target.spill_free_up_to is not None and row["dim"] <= target.spill_free_up_to
        (problems if promised else notes).append(spill)
    if row["shared"] > target.shared_per_block:
        problems.append(
            f"{row['shared']} bytes of shared memory > {target.shared_per_block} per block"
        )
    return problems, notes


def known_key(row: dict) -> tuple[str, str, int, str]:
    return row["label"], row["precision"], row["dim"], row["target"]


def _compile_all(requests: dict, jobs: int) -> dict:
    keys = list(requests)
    if jobs > 1 and len(keys) > 1:
        with ProcessPoolExecutor(min(jobs, len(keys))) as pool:
            return dict(zip(keys, pool.map(compile_one, [requests[k] for k in keys]), strict=True))
    return {k: compile_one(requests[k]) for k in keys}


def _rows(cases, jobs: int, label: str | None = None) -> list[dict]:
    """Compiles the launches of ``cases`` (``(name, precision, dim, target, overrides)``),
    or only those labelled ``label``."""
    requests, rows = {}, []
    for name, precision, dim, target_name, overrides in cases:
        for launch in record_launches(dim, precision, TARGETS[target_name], overrides):
            if label is not None and launch.label != label:
                continue
            key = (launch.key(), target_name)
            requests.setdefault(key, (launch, target_name))
            row = dict(label=launch.label, kernel=launch.kernel, module=launch.module)
            row.update(flags=launch.flags)
            row.update(precision=precision, dim=dim, target=target_name, case=name)
            row.update(constexprs=launch.constexprs, key=key)
            rows.append(row)
    measured = _compile_all(requests, jobs)
    for row in rows:
        row.update(measured[row.pop("key")])
        row["problems"], row["notes"] = problems_of(row)
        if not row["error"]:
            target = TARGETS[row["target"]]
            args = (target, row["regs"], row["shared"], row["num_warps"])
            row["blocks_per_sm"] = occupancy(*args)
        only_spills = all(p.startswith("spills") for p in row["problems"])
        row["known"] = bool(row["problems"]) and only_spills and known_key(row) in KNOWN_SPILLS
    return rows


def audit(dims=DIMS, precisions=None, targets=tuple(TARGETS), jobs: int = 1) -> list[dict]:
    """One row per distinct launch and (precision, D, target), with its resources,
    ``problems`` and whether they are ``known`` (in :data:`KNOWN_SPILLS`)."""
    from palmtree.precision import PRECISIONS

    cases = [
        ("plan", precision, dim, target, None)
        for target in targets
        for precision in precisions or PRECISIONS
        for dim in dims
    ]
    return _rows(cases, jobs)


def calibrate(jobs: int = 1) -> list[dict]:
    """The first forward launch of each :data:`CALIBRATION` plan on sm_90: must fail."""
    cases = [(name, p, d, "sm_90", o) for name, (p, d, o) in CALIBRATION.items()]
    return _rows(cases, jobs, label="forward #1")


def vanished(rows: list[dict]) -> list[tuple]:
    """Known findings among the audited cases that no longer spill."""
    audited = {(r["precision"], r["dim"], r["target"]) for r in rows}
    spilling = {known_key(r) for r in rows if any("spills" in p for p in r["problems"])}
    return sorted(k for k in KNOWN_SPILLS if k[1:] in audited and k not in spilling)
