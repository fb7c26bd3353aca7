"""Two torchrun agents on this machine, as two "nodes" of 2 ranks each.

This is the multi-node launch of the README (``--nnodes 2 --nproc-per-node 2``, c10d
rendezvous), with 127.0.0.1 as the rendezvous host: global ranks 0-3 span two agents,
and ``LOCAL_RANK`` differs from ``RANK`` on the second one. ``palmtree verify`` and
``palmtree train`` must both work under it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from palmtree.distributed import free_port

TINY = ["--image-width", "8", "--image-dim", "16", "--text-width", "16", "--text-layers", "1"]
TINY += ["--embed-dim", "16", "--warmup", "1", "--no-progress"]


def two_nodes(module_args: list[str], timeout: float = 300) -> list[tuple[int, str, str]]:
    """Starts two agents that meet on a free loopback port; ``(status, stdout, stderr)`` each."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
    cmd += ["--nproc-per-node", "2", "--rdzv-backend", "c10d"]
    cmd += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"palmtree-test-{port}"]
    cmd += ["-m", "palmtree", *module_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # never inherit a launched world from the test runner
    agents = [
        subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # a timeout ends each agent with its ranks
        )
        for _ in range(2)
    ]
    results = []
    try:
        for agent in agents:
            out, err = agent.communicate(timeout=timeout)
            results.append((agent.returncode, out, err))
    except subprocess.TimeoutExpired:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
        pytest.fail(f"two torchrun agents did not finish in {timeout} s: {cmd}")
    return results


def _report(results) -> dict:
    """The JSON report, which only the agent that holds global rank 0 prints."""
    reports = [json.loads(out) for _, out, _ in results if out.strip()]
    assert len(reports) == 1, results
    return reports[0]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) launch is tested")
def test_verify_across_two_agents():
    args = ["verify", "--json", "--precisions", "ieee", "--backends", "chunked"]
    results = two_nodes([*args, "--batch", "47", "--dim", "16", "--scales", "20"])
    for status, _, err in results:
        assert status == 0, err[-3000:]
    report = _report(results)
    assert report["ok"] and report["world_size"] == 4 and "launched" in report["where"]
    assert report["sizes"][1] == 0 and sum(report["sizes"]) == 47  # uneven, one rank empty
    rows = [(r["loss"], r["passed"]) for r in report["rows"]]
    plain = [("clip", True), ("siglip", True), ("siglip", True)]  # bias -10 and +10
    targets = [("clip", True)] * 3 + [("siglip", True)] * 3  # positive, ignore, negatives
    assert rows == plain + targets


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) launch is tested")
def test_train_across_two_agents(tmp_path):
    # Without --name, rank 0 chooses a new folder and every rank learns its name.
    args = ["train", "--logs-dir", str(tmp_path), "--epochs", "1"]
    results = two_nodes([*args, "--batch-size", "50", "--max-steps", "3", *TINY])
    for status, _, err in results:
        assert status == 0, err[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["clip"]
    said = "".join(out for _, out, _ in results).count(f"a new run in {tmp_path / 'clip'}")
    assert said == 1  # rank 0 alone says it
    results_json = json.loads((tmp_path / "clip" / "results.json").read_text())
    assert results_json["world_size"] == 4 and results_json["launcher"] == "torchrun"
    assert results_json["steps"] == 3 and not results_json["completed"]
    rows = (tmp_path / "clip" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["b_global"] for r in rows] == [200, 200, 200]  # 4 ranks x 50
    state = torch.load(tmp_path / "clip" / "checkpoints" / "latest.pt", weights_only=True)
    assert state["world_size"] == 4 and len(state["rng"]) == 4


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) launch is tested")
def test_a_refused_run_stops_every_rank(tmp_path):
    # Rank 0 cannot take the run folder (another run holds it): every rank must stop
    # with status 2 and one message, instead of waiting for rank 0 in a collective.
    from palmtree.train.rundir import RunLock

    with RunLock(tmp_path / "busy"):
        results = two_nodes(["train", "--logs-dir", str(tmp_path), "--name", "busy", *TINY])
    assert all(status != 0 for status, _, _ in results)
    errors = "".join(err for _, _, err in results)
    assert errors.count("is in use by another palmtree train") == 1, errors[-3000:]
    # torchrun prints its own traceback for a failed worker; none comes from palmtree.
    assert not re.search(r'File "[^"]*palmtree', errors), errors[-3000:]
