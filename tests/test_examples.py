"""Each example in examples/ runs on CPU with 2 gloo ranks, for 2 steps.

The DDP, FSDP2 and Hugging Face examples are launched with torchrun (as their
docstrings say); the Lightning one launches its own ranks. Each must see the whole global batch
(``global batch`` = the sum of the ranks' batches) and exit 0. An example whose library
is not installed is skipped, saying so.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def needs(module: str, install: str):
    missing = importlib.util.find_spec(module) is None
    return pytest.mark.skipif(missing, reason=f"{module} is not installed (pip install {install})")


def lightning_missing() -> bool:
    return all(importlib.util.find_spec(m) is None for m in ("lightning", "pytorch_lightning"))


def run_example(cmd: list[str], timeout: float = 240) -> str:
    """Runs ``cmd`` in its own session, so a timeout ends the launcher and every rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # never inherit a launched world from the test runner
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=EXAMPLES.parent,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd} did not finish in {timeout} s:\n{out[-2000:]}\n{err[-4000:]}")
    assert proc.returncode == 0, f"{cmd} failed:\n{out[-2000:]}\n{err[-4000:]}"
    return out


@pytest.mark.slow
def test_ddp_minimal():
    out = run_example([*TORCHRUN, str(EXAMPLES / "ddp_minimal.py"), "--steps", "2", "--batch", "8"])
    assert "step    2/2" in out and "global batch 15" in out  # 8 + 7: uneven ranks


@pytest.mark.slow
def test_fsdp2_clip():
    """With ``--bf16``: bf16 towers, the loss module sharded apart with fp32 parameters."""
    cmd = [*TORCHRUN, str(EXAMPLES / "fsdp2_clip.py"), "--steps", "2", "--batch", "8", "--bf16"]
    out = run_example(cmd)
    assert "step    2/2" in out and "global batch 15" in out  # 8 + 7: uneven ranks


@pytest.mark.slow
@needs("transformers", "transformers")
def test_hf_clip():
    out = run_example([*TORCHRUN, str(EXAMPLES / "hf_clip.py"), "--steps", "2", "--batch", "8"])
    assert "step    2/2" in out and "global batch 15" in out


@pytest.mark.slow
@pytest.mark.skipif(
    lightning_missing(), reason="Lightning is not installed (pip install lightning)"
)
def test_lightning_clip():
    cmd = [sys.executable, str(EXAMPLES / "lightning_clip.py"), "--devices", "2", "--steps", "2"]
    out = run_example([*cmd, "--batch", "8"])
    assert "step 2/2" in out and "global batch 16 over 2 rank(s)" in out
