"""The fused kernels compile for sm_90 and sm_80, without spills or too much shared memory.

Runs ``benchmarks/compile_audit.py`` once (in a subprocess: the audit needs Triton's
compiler, and this test session runs Triton in its interpreter without a GPU) and checks
its rows: every ``@triton.jit`` kernel of ``palmtree.backends`` was launched and audited,
for every precision, ``D`` in the audit's list, ``bwd_mode`` and target; every launch
compiles; none spills where the plan promises it does not (``KNOWN_SPILLS`` lists the open
findings); each fits the card's shared memory. Two deliberately bad plans must fail the
audit, so that a measurement that sees nothing cannot pass it. No GPU and no CUDA are
needed: this runs in CI (about a minute of compiling on 2 cores the first time, a few
seconds once Triton's cache holds the compiled kernels). Skipped, with the reason, where
Triton cannot compile for a named target.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from palmtree.precision import PRECISIONS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compile_audit.py"
DOCS = ROOT / "docs" / "kernels.md"

pytestmark = pytest.mark.slow


def _load_script():
    spec = importlib.util.spec_from_file_location("compile_audit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # defines things; imports nothing beyond the stdlib
    return module


ca = _load_script()


@pytest.fixture(scope="module")
def audit() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", "-", "--calibrate"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert proc.returncode in (0, 1), f"the audit crashed:\n{proc.stderr[-4000:]}"
    data = json.loads(proc.stdout)
    if "unavailable" in data:
        pytest.skip(f"compile audit unavailable: {data['unavailable']}")
    return data


def _where(row: dict) -> str:
    return f"{row['label']} {row['kernel']} {row['precision']} D={row['dim']} {row['target']}"


def test_every_kernel_precision_dim_mode_and_target_is_audited(audit):
    from palmtree.backends.fused import BWD_MODES

    rows = audit["rows"]
    assert audit["kernels_defined"], "found no @triton.jit kernel in palmtree.backends"
    audited = {f"{r['module']}.{r['kernel']}" for r in rows}
    missing = set(audit["kernels_defined"]) - audited
    assert not missing, f"kernels never launched by the losses (backend='fused'): {missing}"
    cases = {(r["precision"], r["dim"], r["target"]) for r in rows}
    want = {(p, d, t) for p in PRECISIONS for d in ca.DIMS for t in ca.TARGETS}
    assert cases == want
    phases = {r["label"].rsplit(" #", 1)[0] for r in rows}
    for loss in ("", "siglip "):
        assert {f"{loss}forward"} | {f"{loss}backward {mode}" for mode in BWD_MODES} <= phases


def test_every_launch_compiles(audit):
    failed = [f"{_where(r)}: {r['error']}" for r in audit["rows"] if r["error"]]
    assert not failed, "\n".join(failed)


def test_no_spills_where_the_plan_promises_none(audit):
    new = [
        f"{_where(r)}: {p}"
        for r in audit["rows"]
        if not r["known"]
        for p in r["problems"]
        if p.startswith("spills")
    ]
    assert not new, "new register spills (fix the plan, or list them in KNOWN_SPILLS):\n" + (
        "\n".join(new)
    )


def test_known_spills_still_spill(audit):
    assert not audit["vanished"], (
        f"fixed: remove these from KNOWN_SPILLS in benchmarks/audit/targets.py: {audit['vanished']}"
    )


def test_every_launch_fits_shared_memory(audit):
    too_big = [
        f"{_where(r)}: {p}" for r in audit["rows"] for p in r["problems"] if "shared memory" in p
    ]
    assert not too_big, "\n".join(too_big)


def test_the_audit_fails_plans_that_spill_or_overflow_shared_memory(audit):
    """The measurement itself: a plan known to spill and one known to need more shared
    memory than a block may have must both be caught."""
    by_case = {r["case"]: r for r in audit["calibration"]}
    assert set(by_case) == set(ca.CALIBRATION)
    spill, shared = by_case["spill"], by_case["shared"]
    assert spill["error"] is None and spill["spill"] > 0
    assert any(p.startswith("spills") for p in spill["problems"])
    assert shared["error"] is None and shared["shared"] > ca.TARGETS["sm_90"].shared_per_block
    assert any("shared memory" in p for p in shared["problems"])
    forward = [r for r in audit["rows"] if r["label"] == "forward #1" and not r["error"]]
    assert forward and all(0 < r["regs"] <= 255 and r["shared"] > 0 for r in forward)


def test_problems_are_classified_by_the_plans_promise():
    row = dict(error=None, spill=8, shared=1024, dim=512, target="sm_90")
    assert ca.problems_of(row)[0] == ["spills: 8 bytes of local memory per thread"]
    assert ca.problems_of(dict(row, target="sm_80")) == (
        [],
        ["spills: 8 bytes of local memory per thread"],
    )
    assert ca.problems_of(
        dict(row, spill=0, shared=ca.TARGETS["sm_80"].shared_per_block + 1, target="sm_80")
    )[0]
    assert ca.problems_of(dict(row, error="boom"))[0] == ["does not compile: boom"]
    assert ca.problems_of(dict(row, spill=0)) == ([], [])


def test_the_docs_show_every_launch(audit):
    """docs/kernels.md keeps the audit's tables (``make audit`` regenerates them)."""
    text = DOCS.read_text()
    assert ca.DOC_BEGIN in text and ca.DOC_END in text
    section = text.split(ca.DOC_BEGIN, 1)[1].split(ca.DOC_END, 1)[0]
    launches = {(r["label"], r["kernel"]) for r in audit["rows"]}
    missing = [f"{label}: `{kernel}`" for label, kernel in sorted(launches)]
    missing = [m for m in missing if f"#### {m}" not in section]
    assert not missing, f"run `make audit`: {DOCS.name} lacks {missing}"
