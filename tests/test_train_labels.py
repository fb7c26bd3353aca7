"""``palmtree train --same-label positive|ignore``: each pair's label reaches the loss.

The digits' labels are their classes; CSV data name a column of integer ids with
``--label-column``. Most runs train a tiny model in this process (``--nproc 1``) for a
step or two; one slow test spawns 2 ranks with accumulated steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from palmtree.frame import LossModule
from palmtree.train import main
from palmtree.train.data import GlobalBatchSampler
from palmtree.train.digits import prepare_digits
from palmtree.train.plot import main as plot_main

TINY = ["--image-width", "8", "--image-dim", "16", "--text-width", "16", "--text-layers", "1"]
TINY += ["--embed-dim", "16", "--no-progress", "--warmup", "2", "--epochs", "1"]
ONE = ["--nproc", "1", "--batch-size", "100", *TINY]
MODES = {"none": [], "positive": ["--same-label", "positive"], "ignore": ["--same-label", "ignore"]}


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


@pytest.fixture(scope="module")
def digit_runs(tmp_path_factory) -> Path:
    """Two steps of the same tiny model on the same batches, without labels and with
    each ``--same-label``."""
    logs = tmp_path_factory.mktemp("labels")
    for name, flags in MODES.items():
        assert main(["--logs", str(logs), "--name", name, *ONE, "--max-steps", "2", *flags]) == 0
    return logs


def test_each_setting_is_recorded_and_changes_the_loss(digit_runs):
    for name, flags in MODES.items():
        results = _results(digit_runs / name)
        assert results["same_label"] == (flags[1] if flags else None), name
        assert results["label_column"] is None and results["steps"] == 2
        state = torch.load(digit_runs / name / "checkpoints/latest.pt", weights_only=True)
        assert state["model_config"]["same_label"] == results["same_label"]
    # Same initial model, same first batch: only the targets differ.
    first = {name: _rows(digit_runs / name)[0] for name in MODES}
    losses = {name: row["loss"] for name, row in first.items()}
    assert len(set(losses.values())) == 3, losses
    # Taking the same-digit pairs out of the softmax can only lower every term.
    assert losses["ignore"] < losses["none"]


class Spy:
    """Records the ``labels`` of every call of a palmtree loss module."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[torch.Tensor | None] = []
        forward = LossModule.forward

        def spy(module, *args, labels=None, **kwargs):
            self.calls.append(None if labels is None else labels.clone())
            return forward(module, *args, labels=labels, **kwargs)

        monkeypatch.setattr(LossModule, "forward", spy)


def _first_batch_digits(n: int) -> np.ndarray:
    train = prepare_digits(0.2, 0, 32, 10000).train
    sampler = GlobalBatchSampler(len(train), n, seed=0)
    return train.groups[next(iter(sampler))]


@pytest.mark.parametrize(("loss", "mode"), [("clip", "positive"), ("siglip", "ignore")])
def test_the_loss_gets_the_digits_of_its_batch(loss, mode, tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    argv = ["--logs", str(tmp_path), "--name", "r", *ONE, "--loss", loss, "--max-steps", "1"]
    assert main([*argv, "--same-label", mode]) == 0
    (labels,) = spy.calls  # the evaluation does not call the loss
    assert labels.dtype == torch.int64 and labels.shape == (100,)
    assert labels.tolist() == _first_batch_digits(100).tolist()
    assert main([*argv, "--overwrite"]) == 0  # without --same-label: no labels
    assert spy.calls[1:] == [None]


def test_accumulated_micro_batches_carry_their_labels(digit_runs):
    # 2 micro-batches of 50 are the batch of 100 of the "positive" run: the same loss,
    # if each micro-batch's labels reached palmtree.accumulate in order.
    argv = ["--logs", str(digit_runs), "--name", "k2", *ONE, "--batch-size", "50"]
    argv += ["--accum-steps", "2", "--same-label", "positive", "--max-steps", "2"]
    assert main(argv) == 0
    got, want = _rows(digit_runs / "k2"), _rows(digit_runs / "positive")
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "loss_i2t", "loss_t2i", "acc_i2t", "acc_t2i"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)
    assert _results(digit_runs / "k2")["accum_steps"] == 2


def test_resume_keeps_the_same_label_setting(digit_runs, tmp_path, capsys):
    for name in ("positive", "none"):
        shutil.copytree(digit_runs / name, tmp_path / name)
    common = ["--logs", str(tmp_path), *ONE]
    assert main([*common, "--name", "positive", "--resume", "--same-label", "ignore"]) == 2
    err = capsys.readouterr().err
    assert "was trained with --same-label positive; resume it with --same-label positive" in err
    assert main([*common, "--name", "positive", "--resume"]) == 2
    assert "resume it with --same-label positive" in capsys.readouterr().err
    assert main([*common, "--name", "none", "--resume", "--same-label", "positive"]) == 2
    assert "was trained without --same-label; resume it without --same-label" in (
        capsys.readouterr().err
    )
    resumed = [*common, "--name", "positive", "--resume", "--same-label", "positive"]
    assert main([*resumed, "--max-steps", "3"]) == 0
    assert [r["step"] for r in _rows(tmp_path / "positive")] == [1, 2, 3]
    # A checkpoint from before --same-label existed holds no such setting: no labels.
    latest = tmp_path / "none" / "checkpoints" / "latest.pt"
    state = torch.load(latest, weights_only=True)
    del state["model_config"]["same_label"]
    torch.save(state, latest)
    assert main([*common, "--name", "none", "--resume", "--max-steps", "3"]) == 0


def _write_csv(folder: Path, labels: list[str], column: str = "label") -> Path:
    from PIL import Image

    colors = ((220, 30, 30), (30, 200, 30), (30, 30, 220))
    lines = [f"filepath\ttitle\t{column}"]
    for i, label in enumerate(labels):
        pixels = np.full((12, 12, 3), colors[i % 3], dtype=np.uint8)
        pixels[i % 12, :, :] = 255
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        lines.append(f"img{i}.png\tsquare number {i}\t{label}")
    path = folder / "pairs.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _csv_argv(tsv: Path, folder: Path) -> list[str]:
    argv = ["--train-data", str(tsv), "--logs", str(folder), "--nproc", "1", "--epochs", "1"]
    return argv + ["--batch-size", "6", "--image-size", "16", "--no-progress"]


def test_csv_label_column(tmp_path, monkeypatch):
    ids = [str(i % 3) for i in range(12)]
    tsv = _write_csv(tmp_path, ids)
    spy = Spy(monkeypatch)
    argv = [*_csv_argv(tsv, tmp_path), "--label-column", "label", "--same-label", "ignore"]
    assert main(argv) == 0
    assert len(spy.calls) == 2  # 12 rows, 6 a step
    order = list(GlobalBatchSampler(12, 6, seed=0))
    for labels, rows in zip(spy.calls, order, strict=True):
        assert labels.tolist() == [int(ids[i]) for i in rows]
    results = _results(tmp_path / "clip")
    assert results["same_label"] == "ignore" and results["label_column"] == "label"
    assert results["data"]["distinct_labels"] == 3


@pytest.mark.parametrize(
    ("cells", "column", "message"),
    [
        (["1"] * 12, "klass", "--label-column 'klass' not found; the header holds"),
        (["0", "red"] * 6, "label", "line 3: --label-column 'label' holds 'red', not an integer"),
        (["2.5"] * 12, "label", "line 2: --label-column 'label' holds '2.5', not an integer"),
        (["1", ""] * 6, "label", "line 3: --label-column 'label' holds '', not an integer"),
        ([str(2**63)] * 12, "label", "not an integer id; the column must hold one integer"),
    ],
)
def test_a_bad_label_column_is_a_clear_error(cells, column, message, tmp_path, capsys):
    tsv = _write_csv(tmp_path, cells)
    argv = [*_csv_argv(tsv, tmp_path), "--label-column", column, "--same-label", "positive"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("palmtree train: error: ") and message in err, err
    assert "Traceback" not in err and not (tmp_path / "clip").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--same-label", "same"], "--same-label: invalid choice"),
        (["--label-column", "y"], "--label-column names a column of --train-data"),
    ],
)
def test_bad_label_flags(argv, message, capsys, tmp_path):
    assert main(["--logs", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_csv_label_flags_come_together(tmp_path, capsys):
    tsv = _write_csv(tmp_path, ["1"] * 12)
    assert main([*_csv_argv(tsv, tmp_path), "--same-label", "positive"]) == 2
    assert "--same-label with --train-data needs --label-column NAME" in capsys.readouterr().err
    assert main([*_csv_argv(tsv, tmp_path), "--label-column", "label"]) == 2
    assert "--label-column gives the labels of --same-label" in capsys.readouterr().err


def test_plot_of_several_runs(digit_runs, tmp_path, capsys):
    out = tmp_path / "labels.png"
    runs = [str(digit_runs / name) for name in MODES]
    assert plot_main([*runs, "--out", str(out), "--title", "three runs"]) == 0
    assert out.stat().st_size > 10_000 and str(out) in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        plot_main([str(tmp_path / "nothing"), "--out", str(out)])
    assert exc.value.code == 2 and "no metrics.jsonl in" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_accumulated_match_one_process(tmp_path):
    """2 spawned ranks x 2 micro-batches of 50 against one process with batches of 200:
    the labels are gathered over the ranks in order. The epoch's last step (38 pairs)
    leaves rank 1 without micro-batches, so it passes ``labels=[]``."""
    common = ["--logs", str(tmp_path), *TINY, "--same-label", "positive"]
    spawned = ["--name", "two", "--nproc", "2", "--batch-size", "50", "--accum-steps", "2"]
    assert main([*common, *spawned]) == 0
    assert main([*common, "--name", "one", "--nproc", "1", "--batch-size", "200"]) == 0
    got, want = _rows(tmp_path / "two"), _rows(tmp_path / "one")
    assert [r["b_global"] for r in got] == [200] * 7 + [38]
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "loss_i2t", "loss_t2i", "logit_scale"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)
    results = _results(tmp_path / "two")
    assert results["world_size"] == 2 and results["same_label"] == "positive"
