"""``palmtree train`` on bad flags, bad data and damaged run folders.

Each case was a Python traceback or lost data once. Now bad flags and bad input stop
with exit status 2 and a message that names the problem, before anything is written;
what a killed run leaves behind is cleaned up or tolerated on the next run, and a
finished run is never replaced unless asked. Most cases stop before any rank starts;
those that train do so in this process (``--nproc 1``) with a tiny model for a step or
two.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from palmtree.train import main
from palmtree.train.checkpoint import FORMAT
from palmtree.train.csv_data import read_csv_rows
from palmtree.train.rundir import RunLock, prepare_run_dir, trim_metrics

# Two steps of a tiny model in this process: a checkpoint in about a second.
TINY = ["--nproc", "1", "--epochs", "1", "--batch-size", "100", "--no-progress"]
TINY += ["--image-width", "8", "--image-dim", "16", "--text-width", "16"]
TINY += ["--text-layers", "1", "--embed-dim", "16", "--warmup", "1"]


def run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if '"train"' in line]


# --------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seed", "-1"], "--seed: must be an integer in [0, 2**63), got -1"),
        (["--seed", str(2**63)], "--seed: must be an integer in [0, 2**63)"),
        (["--test-fraction", "nan"], "--test-fraction must be in (0, 1)"),
    ],
)
def test_bad_flag_values(argv, message, capsys, tmp_path):
    code, err = run(capsys, "--logs", str(tmp_path), *argv)
    assert code == 2 and message in err, err
    assert "Traceback" not in err and not any(tmp_path.iterdir())  # nothing was written


@pytest.mark.parametrize(
    ("fraction", "side"), [("0.001", "held out"), ("0.999", "left for training")]
)
def test_test_fraction_that_empties_a_side_of_the_split(fraction, side, capsys, tmp_path):
    # 0.001 held out no digit and crashed in the evaluation; 0.999 trained 0 steps and
    # called the run "completed".
    code, err = run(capsys, "--logs", str(tmp_path), "--test-fraction", fraction)
    assert code == 2, err
    assert f"--test-fraction {fraction} leaves no image of some digits {side}" in err
    assert not any(tmp_path.iterdir())


def test_logs_naming_a_file(capsys, tmp_path):
    not_a_folder = tmp_path / "runs.txt"
    not_a_folder.write_text("notes\n")
    code, err = run(capsys, "--logs", str(not_a_folder))
    assert code == 2 and f"--logs: {not_a_folder} is a file" in err, err
    (tmp_path / "demo").write_text("")
    code, err = run(capsys, "--logs", str(tmp_path), "--name", "demo")
    assert code == 2 and f"--name: {tmp_path / 'demo'} is a file" in err, err
    assert not_a_folder.read_text() == "notes\n"


# --------------------------------------------------------------------------- installation

WITHOUT_THE_EXTRA = textwrap.dedent(
    """
    import sys
    for name in ("numpy", "sklearn", "matplotlib", "tqdm", "PIL"):
        sys.modules[name] = None  # as if not installed: importing it fails
    from palmtree.cli import main
    assert main(["train", "--help"]) == 0  # prints the flags
    sys.exit(main(["train", "--logs", sys.argv[1]]))
    """
)


def test_without_the_train_extra_it_says_what_to_install(tmp_path):
    # After `pip install .` without extras this was a ModuleNotFoundError traceback.
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_THE_EXTRA, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--accum-steps" in proc.stdout  # --help still works
    assert "palmtree train: error: it needs the project's [train] extra" in proc.stderr
    assert "numpy, matplotlib, scikit-learn, tqdm are not installed" in proc.stderr
    assert "pip install '.[train]'" in proc.stderr
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- CSV data


def _csv_with_a_latin1_caption(folder: Path) -> Path:
    from PIL import Image

    rows = [b"filepath\ttitle"]
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(f"{i}.png\ta grey square number {i}".encode())
    rows.append("0.png\tun carré gris".encode("latin-1"))  # b"\xe9": not UTF-8
    path = folder / "pairs.tsv"
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


def test_caption_that_is_not_utf8_is_a_bad_row(tmp_path, capsys):
    tsv = _csv_with_a_latin1_caption(tmp_path)
    rows = read_csv_rows(str(tsv), "filepath", "title", "\t")
    assert rows.total == 5 and len(rows.paths) == 4
    assert [(line, reason) for line, reason, _ in rows.bad] == [(6, "caption not UTF-8")]

    # 1 bad row of 5 is above the default --max-bad-fraction (0.1): a clear stop.
    code, err = run(capsys, "--train-data", str(tsv), "--logs", str(tmp_path / "runs"))
    assert code == 2 and "Traceback" not in err, err
    assert "1 of 5 rows are bad" in err and "1 caption not UTF-8" in err and "line 6" in err


# --------------------------------------------------------------------------- resume


def test_resume_drops_a_torn_last_line_and_old_checkpoint_debris(tmp_path, capsys):
    logs = tmp_path / "runs"
    common = [*TINY, "--logs", str(logs), "--name", "torn"]
    assert main([*common, "--max-steps", "2"]) == 0
    run_dir = logs / "torn"
    assert steps(run_dir) == [1, 2]
    # A kill while writing step 3's row, and another while writing a checkpoint.
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "loss": 2.')
    debris = run_dir / "checkpoints" / ".latest.pt.tmp12345"
    debris.write_bytes(b"half a checkpoint")
    capsys.readouterr()

    code, err = run(capsys, *common, "--resume", "--max-steps", "3")
    assert code == 0, err
    assert "dropping the partial last line 3" in err
    assert steps(run_dir) == [1, 2, 3]
    assert not debris.exists()


def test_trim_metrics_keeps_checkpointed_rows_and_refuses_a_foreign_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": s} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trim_metrics(path, keep_until_step=2)  # step 3 came after the checkpoint
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]

    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    from palmtree.train.data import TrainError

    with pytest.raises(TrainError, match=r"line 2, is not a metrics row"):
        trim_metrics(path, keep_until_step=5)


def test_resume_of_a_file_that_is_not_a_complete_checkpoint(tmp_path, capsys):
    partial = tmp_path / "partial.pt"
    torch.save({"format": FORMAT, "epoch": 1, "global_step": "ten"}, partial)
    code, err = run(capsys, "--logs", str(tmp_path), "--name", "x", "--resume", str(partial))
    assert code == 2 and "Traceback" not in err, err
    assert f"{partial} is not a complete palmtree train checkpoint" in err
    assert "lacks step_in_epoch, world_size, model, optimizer" in err
    assert "wrong type for global_step (str, expected int)" in err

    other = tmp_path / "weights.pt"
    torch.save({"model": {}}, other)
    code, err = run(capsys, "--logs", str(tmp_path), "--name", "x", "--resume", str(other))
    assert code == 2 and "is not a palmtree train checkpoint" in err, err


# --------------------------------------------------------------------------- run folder


def _files(run_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_a_fresh_run_never_replaces_a_run_unless_asked(tmp_path, capsys):
    # A second run with the same --name cleared the first one's files and exited 0.
    named = [*TINY, "--logs", str(tmp_path), "--name", "mine"]
    assert main([*named, "--max-steps", "1"]) == 0
    run_dir = tmp_path / "mine"
    first = _files(run_dir)
    assert {"metrics.jsonl", "results.json", "checkpoints/latest.pt"} <= set(first)
    capsys.readouterr()

    code, err = run(capsys, *named, "--max-steps", "1")
    assert code == 2, err
    assert err == (
        f"palmtree train: error: {run_dir} already holds a run (metrics.jsonl, results.json, "
        "curves.png, checkpoints/latest.pt); --overwrite replaces it, --resume continues it, "
        "another --name (or none: a new folder) keeps it\n"
    )
    assert _files(run_dir) == first  # not a byte changed

    assert main([*named, "--max-steps", "2", "--overwrite"]) == 0  # replaced: 2 steps
    assert "--overwrite removed metrics.jsonl, results.json" in capsys.readouterr().out
    assert steps(run_dir) == [1, 2]
    code, err = run(capsys, *named, "--overwrite", "--resume")  # which one?
    assert code == 2 and "--overwrite replaces the run of --name with a fresh one" in err


def test_without_a_name_every_run_gets_a_new_folder(tmp_path, capsys):
    # The README's commands in order, `make demo`, `palmtree train --loss siglip`, then
    # `make demo` again, all went to runs/demo, each one erasing the one before.
    common = [*TINY, "--logs", str(tmp_path), "--max-steps", "1"]
    for extra in ([], ["--loss", "siglip"], []):
        assert main([*common, *extra]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip", "clip-2", "siglip"]
    for name, loss in (("clip", "clip"), ("siglip", "siglip"), ("clip-2", "clip")):
        assert json.loads((tmp_path / name / "results.json").read_text())["loss"] == loss
        assert f"a new run in {tmp_path / name} (--name {name} --resume continues it)" in out

    code, err = run(capsys, *common, "--resume")  # which run? a --name must say
    assert code == 2 and "--resume continues the run in <logs>/<name>: give its --name" in err
    code, err = run(capsys, *common, "--overwrite")
    assert code == 2 and "--overwrite replaces the run of --name" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip", "clip-2", "siglip"]


def test_a_second_run_with_the_same_name_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    (run_dir / "checkpoints").mkdir(parents=True)
    kept = run_dir / "metrics.jsonl"
    kept.write_text('{"kind": "train", "step": 1}\n')
    with RunLock(run_dir):  # the first run, still going
        code, err = run(capsys, "--logs", str(tmp_path), "--name", "demo")
        assert code == 2, err
        assert f"the run folder {run_dir} is in use by another palmtree train" in err
        assert kept.exists()  # the second run touched nothing
    RunLock(run_dir).acquire().release()  # free again once the first run ends


def test_prepare_run_dir_removes_checkpoint_debris_of_a_killed_write(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "latest.pt").write_bytes(b"x")
    (ckpts / ".latest.pt.tmp4242").write_bytes(b"half")
    (ckpts / ".epoch_3.pt.tmp4242").write_bytes(b"half")
    prepare_run_dir(tmp_path / "run", resume_step=7)  # a resume keeps the checkpoint
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest.pt"]
