"""The run folder ``<logs>/<name>/``: one run at a time, and no run lost.

The launching process (the parent of spawned ranks, or rank 0 under torchrun) takes
:class:`RunLock` before touching anything in the folder and holds it until the run
ends, so a second run with the same ``--name`` is refused instead of interleaving its
metrics and checkpoints with the first one's. A fresh run never replaces a finished
one unless asked to (``--overwrite``): without ``--name`` it claims a folder that does
not exist yet (:func:`new_run_dir`), and with a ``--name`` that holds a run it is
refused (:func:`prepare_run_dir`).
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


def new_run_dir(logs: Path, base: str) -> Path:
    """Creates and returns the first of ``<logs>/<base>``, ``<base>-2``, ``<base>-3``, ...
    that does not exist yet.

    ``mkdir`` either creates a folder or fails because it exists, so two runs started
    at the same moment never claim the same one.
    """
    try:
        logs.mkdir(parents=True, exist_ok=True)
        number = 1
        while True:
            run_dir = logs / (base if number == 1 else f"{base}-{number}")
            try:
                run_dir.mkdir()
                return run_dir
            except FileExistsError:
                number += 1
    except OSError as exc:
        raise TrainError(f"cannot create a run folder in {logs}: {exc}") from exc


def held_run(run_dir: Path) -> list[str]:
    """What of a previous run ``run_dir`` holds: its non-empty :data:`OWN_FILES` and
    checkpoints, as paths relative to it (empty: nothing a fresh run could destroy)."""
    found = [name for name in OWN_FILES if _non_empty(run_dir / name)]
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir():
        found += sorted(f"checkpoints/{f.name}" for f in ckpts.glob("*.pt"))
    return found


def _non_empty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def prepare_run_dir(run_dir: Path, resume_step: int | None, overwrite: bool = False) -> list[str]:
    """Readies the locked run folder for a fresh run or for a resume; returns what of a
    previous run it removed (:func:`held_run`).

    A fresh run (``resume_step`` is ``None``) into a folder that holds a run is refused
    with a :class:`TrainError` that lists what is there, unless ``overwrite``: then the
    files that run wrote are removed first. A resume keeps ``metrics.jsonl`` up to
    ``resume_step`` (what the checkpoint covers). All remove the temporary files of a
    killed checkpoint write.
    """
    ckpts = run_dir / "checkpoints"
    found: list[str] = []
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            found = held_run(run_dir)
            if found and not overwrite:
                raise TrainError(
                    f"{run_dir} already holds a run ({', '.join(found)}); --overwrite "
                    "replaces it, --resume continues it, another --name (or none: a new "
                    "folder) keeps it"
                )
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
    return found


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
