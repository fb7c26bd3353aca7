"""Checkpoint files: plain tensors, numbers and strings only, written atomically.

They load with ``torch.load(path, weights_only=True)``. What they hold, and how a rank
builds and restores it, is :mod:`.state`'s business; this module writes, publishes,
checks and finds the files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .data import TrainError

FORMAT = 1


def save_atomic(obj: dict, path: Path) -> None:
    """Writes to a temporary file in the same folder, then renames it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def keep_as(latest: Path, name: str) -> Path:
    """Publishes ``latest`` also as ``name`` (a hard link, else a copy) and removes the
    older ``epoch_*.pt`` files, so the folder holds one checkpoint's bytes."""
    target = latest.with_name(name)
    tmp = latest.with_name(f".{name}.tmp{os.getpid()}")
    try:
        try:
            os.link(latest, tmp)
        except OSError:
            shutil.copyfile(latest, tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    for old in latest.parent.glob("epoch_*.pt"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return target


#: What every checkpoint holds, with the type each entry must have.
REQUIRED = {
    "epoch": int,
    "step_in_epoch": int,
    "global_step": int,
    "world_size": int,
    "model": dict,
    "optimizer": dict,
    "rng": list,
    "tokenizer": dict,
    "model_config": dict,
}


def load(path: str | Path) -> dict:
    """Loads a checkpoint and checks that it holds what ``--resume`` needs.

    Raises :class:`TrainError` naming the file and what is wrong with it (not found,
    not loadable, another format, or missing or mistyped entries).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainError(f"checkpoint not found: {path}") from None
    except Exception as exc:
        raise TrainError(f"cannot load checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainError(f"{path} is not a palmtree train checkpoint (format {FORMAT})")
    missing = [k for k in REQUIRED if k not in state]
    wrong = [
        f"{k} ({type(state[k]).__name__}, expected {REQUIRED[k].__name__})"
        for k in REQUIRED
        if k in state and not isinstance(state[k], REQUIRED[k])
    ]
    if missing or wrong:
        problems = ([f"lacks {', '.join(missing)}"] if missing else []) + (
            [f"has a wrong type for {', '.join(wrong)}"] if wrong else []
        )
        raise TrainError(
            f"{path} is not a complete palmtree train checkpoint: it {' and '.join(problems)}"
        )
    return state


def remove_debris(folder: Path) -> list[Path]:
    """Removes the temporary files that a killed checkpoint write left in ``folder``.

    Only call it while holding the run folder's lock: then no other process is writing
    there, so every ``.*.tmp<pid>`` file is left over from a process that died.
    """
    removed = []
    for tmp in folder.glob(".*.tmp*") if folder.is_dir() else ():
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    if resume is None:
        return None
    path = run_dir / "checkpoints" / "latest.pt" if resume == "latest" else Path(resume)
    if not path.is_file():
        raise TrainError(
            f"--resume: no checkpoint at {path}"
            + (" (has this run written one yet?)" if resume == "latest" else "")
        )
    return path


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
