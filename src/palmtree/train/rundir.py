"""The run folder ``<logs>/<name>/``: one run at a time, and a clean start or resume.

The launching process (the parent of spawned ranks, or rank 0 under torchrun) takes
:class:`RunLock` before touching anything in the folder and holds it until the run
ends, so a second run with the same ``--name`` is refused instead of interleaving its
metrics and checkpoints with the first one's.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from . import checkpoint
from .data import TrainError

#: Files of a run that a fresh run with the same name removes first.
OWN_FILES = ("metrics.jsonl", "results.json", "curves.png")
LOCK_NAME = ".lock"


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock``, taken without waiting.

    The kernel drops the lock when its holder exits, however it exits, so a killed run
    never leaves the folder locked. The file holds the holder's pid and host, for the
    message that refuses a second run.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self.file = None

    def acquire(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            file = open(self.path, "a+")
        except OSError as exc:
            raise TrainError(
                f"cannot use the run folder {self.path.parent}: {exc.strerror or exc}"
            ) from exc
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            raise TrainError(
                f"the run folder {self.path.parent} is in use by another palmtree train "
                f"(pid and host: {holder}); wait for it to finish, or choose another --name"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()} {socket.gethostname()}\n")
        file.flush()
        self.file = file
        return self

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the last descriptor releases the flock
            self.file = None

    def __enter__(self) -> RunLock:
        return self if self.file is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def prepare_run_dir(run_dir: Path, resume_step: int | None) -> None:
    """Readies the locked run folder for a fresh run or for a resume.

    A fresh run (``resume_step`` is ``None``) removes the files a previous run with
    this name wrote. A resume keeps ``metrics.jsonl`` up to ``resume_step`` (what the
    checkpoint covers). Both remove the temporary files of a killed checkpoint write.
    """
    ckpts = run_dir / "checkpoints"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            for name in OWN_FILES:
                (run_dir / name).unlink(missing_ok=True)
            if ckpts.is_dir():
                for f in ckpts.glob("*.pt"):
                    f.unlink()
        else:
            trim_metrics(run_dir / "metrics.jsonl", resume_step)
        checkpoint.remove_debris(ckpts)
    except OSError as exc:
        raise TrainError(f"cannot prepare the run folder {run_dir}: {exc}") from exc


def trim_metrics(path: Path, keep_until_step: int) -> None:
    """Keeps the rows of ``metrics.jsonl`` up to ``keep_until_step``.

    A run killed after its last checkpoint logged steps that the resumed run repeats;
    those rows go. A run killed in the middle of writing a row left a partial last line;
    it goes too, with a note. Any other line that is not a JSON row with a ``step`` is
    an error naming the line, as the file is then not this command's log.
    """
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file ends with a newline, as every complete row does
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = _parse_row(line)
        if row is None:
            if number == len(lines):
                print(
                    f"palmtree train: dropping the partial last line {number} of {path} "
                    "(the run was stopped while writing it)",
                    file=sys.stderr,
                )
                continue
            raise TrainError(
                f"{path}, line {number}, is not a metrics row (JSON with a step): "
                f"{line[:80]!r}; repair or remove the file to resume"
            )
        if row["step"] <= keep_until_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _parse_row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        return None
    return row
