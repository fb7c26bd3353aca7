"""``palmtree verify``: it passes on a correct library, and fails loudly otherwise.

The failure paths are driven by the command's hidden ``--inject-fault KIND:RANK``: a
rank that raises, one that hangs (the timeout must end the run and name the ranks),
and one whose gradient is wrong (the comparison must catch it on any rank).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from palmtree import cli, verify

SMALL = ["--batch", "47", "--dim", "16"]


def run(capsys, *args):
    code = verify.main([*SMALL, *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_split_is_uneven_with_an_empty_rank(n):
    for big in (47, 389, 1000):
        sizes = verify.split_sizes(big, n)
        assert sum(sizes) == big and len(sizes) == n
        if n >= 3:
            assert sizes[1] == 0
        nonempty = [s for s in sizes if s]
        assert len(set(nonempty)) == len(nonempty)  # all different


def test_three_ranks_pass_and_report_json(capsys):
    code, out, _ = run(capsys, "--nproc", "3", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["error"] is None
    assert report["world_size"] == 3 and report["sizes"][1] == 0 and sum(report["sizes"]) == 47
    rows = report["rows"]
    combos = {(r["backend"], r["precision"], r["logit_scale"]) for r in rows}
    assert combos == {
        (b, p, s)
        for b in ("reference", "chunked")
        for p in ("ieee", "tf32", "bf16")
        for s in verify.DEFAULT_SCALES
    }
    for r in rows:
        assert r["passed"] and 0 <= r["worst"] <= 1, r
        for q in verify.QUANTITIES:
            assert 0 <= r["errors"][q] <= r["tolerances"][q], (r, q)
        # Tolerances follow what the precision achieves: bf16 looser than ieee.
    by = {(r["backend"], r["precision"], r["logit_scale"]): r for r in rows}
    for s in verify.DEFAULT_SCALES:
        ieee, bf16 = by["chunked", "ieee", s], by["chunked", "bf16", s]
        assert ieee["tolerances"]["d_image"] < 1e-4 < bf16["tolerances"]["d_image"]


def test_table_and_a_wrong_gradient_on_one_rank_fails(capsys):
    args = ["--nproc", "2", "--precisions", "ieee,bf16", "--scales", "20"]
    code, out, _ = run(capsys, *args)
    assert code == 0, out
    assert "global batch 47 split [18, 29]" in out
    assert out.count("PASS") == 4 and "4 of 4 rows passed." in out

    code, out, _ = run(capsys, *args, "--inject-fault", "wrong:1")
    assert code == 1
    assert out.count("FAIL") == 4 and "0 of 4 rows passed." in out


def test_a_rank_that_raises_is_named(capsys):
    start = time.monotonic()
    code, out, err = run(capsys, "--nproc", "2", "--json", "--inject-fault", "raise:1")
    report = json.loads(out)
    assert code == 1 and not report["ok"] and report["rows"] == []
    assert report["error"].startswith("rank 1 failed: RuntimeError: injected fault"), report
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_a_hang_times_out_naming_the_ranks(capsys):
    start = time.monotonic()
    code, out, err = run(capsys, "--nproc", "2", "--inject-fault", "hang:1", "--timeout", "8")
    assert code == 1 and out == ""
    assert "timed out after 8 s: rank(s) 0, 1 did not finish" in err, err
    assert "  rank 1 [" in err
    assert time.monotonic() - start < 40  # the timeout, process start-up and clean-up


def test_usage_errors(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert verify.main(["--backends", "chunked,nope"]) == 2
    assert "backends must be a comma-separated subset" in capsys.readouterr().err
    assert verify.main(["--scales", "0"]) == 2
    assert verify.main(["--backends", "fused"]) == 2
    assert "backend 'fused' cannot run here" in capsys.readouterr().err
    assert cli.main(["verify", "--help"]) == 0
    assert "--nproc" in capsys.readouterr().out


def test_innermost_frame_of_the_checks_thread():
    dump = (
        "Thread 0x00007f (most recent call first):\n"
        '  File "/usr/lib/python3.11/threading.py", line 320 in wait\n'
        "\n"
        "Current thread 0x00007e (most recent call first):\n"
        '  File "/x/torch/distributed/distributed_c10d.py", line 4394 in all_gather_single\n'
        '  File "/x/palmtree/verify.py", line 361 in run_checks\n'
    )
    where = verify.innermost_frame(dump)
    assert where == "waiting in a collective (distributed_c10d.py:4394 all_gather_single)"
    assert verify.innermost_frame('Current thread 0x1:\n  File "a.py", line 1 in f\n') is None


@pytest.mark.slow
def test_under_torchrun_uses_the_launched_world():
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "palmtree", "verify", "--json", "--precisions", "ieee", *SMALL,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["ok"] and report["world_size"] == 2 and "launched" in report["where"]
    assert len(report["rows"]) == 2 * len(verify.DEFAULT_SCALES)
