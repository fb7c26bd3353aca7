"""Checkpoints: plain tensors, numbers and strings only, written atomically.

They load with ``torch.load(path, weights_only=True)``. A checkpoint holds the model
(towers and the loss's temperature and projections), the optimizer, the position in
the run (epoch, step within it, global step), every rank's RNG state, the tokenizer
and the model config, so ``--resume`` continues exactly where the run stopped.
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
    older ``epoch_*.pt`` / ``step_*.pt`` files, so the folder holds one checkpoint's bytes."""
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
    for old in [*latest.parent.glob("epoch_*.pt"), *latest.parent.glob("step_*.pt")]:
        if old.name != name:
            old.unlink(missing_ok=True)
    return target


def load(path: str | Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainError(f"checkpoint not found: {path}") from None
    except Exception as exc:
        raise TrainError(f"cannot load checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainError(f"{path} is not a palmtree train checkpoint (format {FORMAT})")
    return state


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
