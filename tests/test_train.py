"""``palmtree train`` end to end, driven through ``main(argv)``.

Tiny settings keep it fast: batch 100 per rank on 2 gloo ranks makes 8 steps per epoch
over the 1438 training digits, and the last global batch (38 pairs) leaves rank 1 empty.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from palmtree.train import main
from palmtree.train.launch import report_rank_failure
from palmtree.train.tokenizer import WordTokenizer

FAST = ["--batch-size", "100", "--no-progress", "--warmup", "4"]
TIMING = {"wall_seconds", "train_seconds", "pairs_seen_this_run", "resumed_from"}


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "samples_per_s"}


def _pair_mean(rows: list[dict]) -> float:
    """The mean loss over the pairs of these steps (each step's loss is a mean)."""
    return sum(r["loss"] * r["b_global"] for r in rows) / sum(r["b_global"] for r in rows)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """Two epochs on two spawned gloo ranks, uninterrupted."""
    logs = tmp_path_factory.mktemp("runs")
    assert main(["--logs", str(logs), "--name", "full", "--epochs", "2", *FAST]) == 0
    return logs / "full"


@pytest.mark.slow
def test_two_ranks_end_to_end(full_run):
    results = json.loads((full_run / "results.json").read_text())
    for key in ("zero_shot_top1", "image_to_text_r1", "text_to_image_r1"):
        assert 0.0 <= results[key] <= 1.0
    assert results["world_size"] == 2 and results["epochs"] == 2 and results["steps"] == 16
    assert results["completed"] and results["wall_seconds"] > 0
    assert results["zero_shot_top1"] > 0.3  # far above chance (0.1) after 16 steps

    rows = _rows(full_run)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 17))
    assert [r["epoch"] for r in evals] == [1, 2]
    # No padding: every epoch sees each of the 1438 training pairs exactly once.
    assert sum(r["b_global"] for r in train[:8]) == 1438
    assert train[7]["b_global"] == 38  # rank 0: 38 pairs, rank 1: none
    # The reported training loss is epoch 2's mean over its pairs, not the loss of its
    # short last batch (38 pairs), which the log-sum-exp over fewer negatives lowers.
    assert "final_loss" not in results
    assert results["train_loss_last_epoch"] == pytest.approx(_pair_mean(train[8:16]), rel=1e-14)
    assert train[15]["loss"] < 0.9 * results["train_loss_last_epoch"]
    for r in train:
        for key in ("loss", "acc_i2t", "acc_t2i", "logit_scale", "samples_per_s"):
            assert math.isfinite(r[key])
    assert (full_run / "curves.png").stat().st_size > 10_000

    ckpts = sorted(p.name for p in (full_run / "checkpoints").glob("*.pt"))
    assert ckpts == ["epoch_2.pt", "latest.pt"]
    state = torch.load(full_run / "checkpoints" / "latest.pt", weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 16 and len(state["rng"]) == 2
    tok = WordTokenizer.from_state_dict(state["tokenizer"])
    assert tok.encode("a handwritten seven")[-1] != 1  # "seven" is in the vocabulary


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(full_run):
    logs = full_run.parent
    common = ["--logs", str(logs), "--name", "resumed", "--epochs", "2", *FAST]
    assert main([*common, "--max-steps", "11"]) == 0  # "killed" in the middle of epoch 2
    stopped = json.loads((logs / "resumed" / "results.json").read_text())
    assert not stopped["completed"] and stopped["steps"] == 11
    # Stopped in epoch 2: the training loss it reports is that of epoch 1, complete.
    epoch_1 = [r for r in _rows(full_run) if r["kind"] == "train"][:8]
    assert stopped["train_loss_last_epoch"] == pytest.approx(_pair_mean(epoch_1), rel=1e-14)
    # latest.pt holds step 11; epoch_1.pt stays the end of epoch 1 (steps 1 to 8).
    ckpts = logs / "resumed" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["epoch_1.pt", "latest.pt"]
    assert torch.load(ckpts / "latest.pt", weights_only=True)["global_step"] == 11
    assert torch.load(ckpts / "epoch_1.pt", weights_only=True)["global_step"] == 8
    assert main([*common, "--resume"]) == 0

    want = json.loads((full_run / "results.json").read_text())
    got = json.loads((logs / "resumed" / "results.json").read_text())
    assert {k: v for k, v in got.items() if k not in TIMING} == {
        k: v for k, v in want.items() if k not in TIMING
    }
    assert [_untimed(r) for r in _rows(logs / "resumed")] == [_untimed(r) for r in _rows(full_run)]


# A tiny model for the runs below, whose figures are not the point.
TINY = ["--image-width", "8", "--image-dim", "16", "--text-width", "16", "--text-layers", "1"]
TINY += ["--embed-dim", "16", "--no-progress", "--warmup", "2", "--epochs", "1"]
ACCUM = ["--accum-steps", "2"]


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory) -> Path:
    """One epoch on 2 spawned ranks as 2 micro-batches of 50 per rank and step (``k2``),
    and as one batch of 100 (``k1``): 8 steps over global batches of 200, the last one
    38 pairs, all on rank 0, as one micro-batch (rank 1 holds none)."""
    logs = tmp_path_factory.mktemp("accum")
    assert main(["--logs", str(logs), "--name", "k2", "--batch-size", "50"] + ACCUM + TINY) == 0
    assert main(["--logs", str(logs), "--name", "k1", "--batch-size", "100", *TINY]) == 0
    return logs


@pytest.mark.slow
def test_accumulated_steps_train_like_one_large_batch(accumulated):
    k2, k1 = _rows(accumulated / "k2"), _rows(accumulated / "k1")
    assert [r["kind"] for r in k2] == ["train"] * 8 + ["eval"]
    assert [r["b_global"] for r in k2[:8]] == [200] * 7 + [38] == [r["b_global"] for r in k1[:8]]
    # The same pairs in each step and the exact gradient of one loss over them: the two
    # runs differ only by rounding (the towers see batches of other sizes).
    for a, b in zip(k2[:8], k1[:8], strict=True):
        for key in ("loss", "loss_i2t", "loss_t2i", "logit_scale"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)
    results = json.loads((accumulated / "k2" / "results.json").read_text())
    assert results["accum_steps"] == 2 and results["batch_size_per_rank"] == 50
    assert results["steps"] == 8 and results["completed"] and results["world_size"] == 2


@pytest.mark.slow
def test_resume_with_accumulated_steps(accumulated):
    common = ["--logs", str(accumulated), "--name", "k2_resumed", "--batch-size", "50"]
    common += ACCUM + TINY
    assert main([*common, "--max-steps", "3"]) == 0
    state = torch.load(accumulated / "k2_resumed/checkpoints/latest.pt", weights_only=True)
    assert (state["global_step"], state["step_in_epoch"]) == (3, 3)  # steps, not micro-batches
    assert state["args"]["accum_steps"] == 2
    assert main([*common, "--resume"]) == 0
    want = json.loads((accumulated / "k2" / "results.json").read_text())
    got = json.loads((accumulated / "k2_resumed" / "results.json").read_text())
    assert {k: v for k, v in got.items() if k not in TIMING} == {
        k: v for k, v in want.items() if k not in TIMING
    }
    resumed, uninterrupted = _rows(accumulated / "k2_resumed"), _rows(accumulated / "k2")
    assert [_untimed(r) for r in resumed] == [_untimed(r) for r in uninterrupted]


def test_siglip_run_and_its_resume(tmp_path, capsys):
    common = ["--logs", str(tmp_path), "--name", "sig", "--nproc", "1", "--batch-size", "100"]
    common += TINY
    assert main([*common, "--loss", "siglip", "--max-steps", "2"]) == 0
    rows = _rows(tmp_path / "sig")
    assert {"loss_pos", "loss_neg", "logit_bias"} <= set(rows[0]) and "loss_i2t" not in rows[0]
    # The bias starts at the log-odds of a positive pair: -ln(100 - 1) for 100 pairs.
    assert rows[0]["logit_bias"] == pytest.approx(-math.log(99), abs=1e-6)
    assert rows[0]["logit_scale"] == pytest.approx(10.0, rel=1e-6)
    results = json.loads((tmp_path / "sig" / "results.json").read_text())
    assert results["loss"] == "siglip" and results["final_logit_bias"] < -4
    assert "siglip loss" in capsys.readouterr().out

    assert main([*common, "--resume"]) == 2  # the default --loss is clip
    assert "was trained with --loss siglip; resume it with --loss siglip" in (
        capsys.readouterr().err
    )
    assert main([*common, "--loss", "siglip", "--resume", "--max-steps", "3"]) == 0
    assert [r["step"] for r in _rows(tmp_path / "sig")] == [1, 2, 3]


def _write_csv(folder: Path) -> Path:
    from PIL import Image

    colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    lines = ["filepath\ttitle"]
    for i in range(12):
        name = list(colors)[i % 3]
        pixels = np.full((12, 12, 3), colors[name], dtype=np.uint8)
        pixels[i % 12, :, :] = 255  # a white line, so images of one colour differ
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        lines.append(f"img{i}.png\ta {name} square with a line")
    (folder / "garbage.png").write_bytes(b"this is not an image")
    lines.append("missing.png\ta picture that is not there")
    lines.append("garbage.png\tan unreadable file")
    lines.append("img0.png\t   ")
    path = folder / "pairs.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_data_skips_bad_rows(tmp_path, capsys):
    tsv = _write_csv(tmp_path)
    argv = ["--train-data", str(tsv), "--val-data", str(tsv), "--logs", str(tmp_path)]
    argv += ["--nproc", "1", "--epochs", "2", "--batch-size", "4", "--image-size", "16"]
    argv += ["--no-progress", "--max-bad-fraction", "0.25"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "skipped 3 of 15 train rows" in err
    assert "1 missing file" in err and "1 unreadable image" in err and "1 empty caption" in err
    # Without --name the run gets a new folder, named after the loss.
    assert f"palmtree train: a new run in {tmp_path / 'clip'} (--name clip" in out
    results = json.loads((tmp_path / "clip" / "results.json").read_text())
    assert results["data"]["train"]["bad_rows"] == 3 and results["data"]["train_size"] == 12
    assert results["zero_shot_top1"] is None and 0 <= results["image_to_text_r1"] <= 1
    assert results["world_size"] == 1
    # The summary speaks of captions: free-form CSV captions have no digits, no classes.
    assert "--val-data image->text R@1 / R@5:" in out and "digit" not in out
    assert "the same caption text" in results["retrieval_hit_rule"]

    # 3 bad rows of 15 (20 %) exceed the default threshold of 10 %: a clear stop.
    assert main(argv[:-2]) == 2
    err = capsys.readouterr().err
    assert "3 of 15 rows are bad (20.0%), above --max-bad-fraction 0.1" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "--epochs: must be a positive integer"),
        (["--batch-size", "many"], "--batch-size: invalid"),
        (["--precision", "fp8"], "--precision: invalid choice"),
        (["--backend", "fast"], "--backend: invalid choice"),
        (["--backend", "fused"], "--backend fused needs CUDA ranks"),
        (["--train-data", "/nonexistent/pairs.tsv"], "no such file"),
        (["--val-data", "x.tsv"], "--val-data needs --train-data"),
        (["--csv-separator", "ab"], "must be one character"),
        (["--max-bad-fraction", "1.5"], "must be in [0, 1)"),
        (["--text-width", "30", "--text-heads", "4"], "must be divisible"),
        (["--lr", "nan"], "--lr: must be a positive number"),
        (["--loss", "softmax"], "--loss: invalid choice"),
        (["--accum-steps", "0"], "--accum-steps: must be a positive integer"),
        (["--precision", "amp", "--accum-steps", "2"], "cannot be combined with --accum-steps"),
        (["--unknown-flag"], "unrecognized arguments"),
    ],
)
def test_bad_flags(argv, message, capsys, monkeypatch):
    # Without the interpreter (which conftest turns on for the kernel tests), the fused
    # backend has nothing to run on in CPU ranks.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_resume_without_checkpoint_and_bad_csv_header(tmp_path, capsys):
    assert main(["--logs", str(tmp_path), "--name", "none", "--resume"]) == 2
    assert "--resume: no checkpoint at" in capsys.readouterr().err
    tsv = tmp_path / "wrong.tsv"
    tsv.write_text("path\tcaption\nimg.png\ta thing\n")
    assert main(["--train-data", str(tsv), "--logs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'filepath', 'title' not found" in err and "--csv-img-key" in err


def test_error_in_a_rank_is_reported(capsys):
    # What torch.multiprocessing.spawn raises in the parent when rank 1 raises
    # (spawning real processes for this would cost seconds; the e2e tests spawn).
    import torch.multiprocessing as mp

    child_tb = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom\n'
    exc = mp.ProcessRaisedException(f"\n\n-- Process 1 terminated with:\n{child_tb}", 1, 99)
    report_rank_failure(exc)
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith("rank 1 failed: ValueError: boom")

    msg = "\n\n-- Process 0 terminated with:\npalmtree.train.data.TrainError: bad image x.png\n"
    report_rank_failure(mp.ProcessRaisedException(msg, 0, 98))
    assert capsys.readouterr().err == "palmtree train: rank 0 failed: bad image x.png\n"

    report_rank_failure(mp.ProcessExitedException("killed", 1, 97, -9, "SIGKILL"))
    assert "rank 1 died (signal SIGKILL)" in capsys.readouterr().err
