"""What the launcher readies before any rank trains: the checkpoint to resume, the
data, and the locked run folder. Each problem stops the run with a :class:`TrainError`
that names it, before the run folder is touched."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

from . import checkpoint
from .config import TrainConfig
from .csv_data import prepare_csv
from .data import Prepared, TrainError
from .digits import prepare_digits
from .models import ModelConfig
from .rundir import RunLock, new_run_dir, prepare_run_dir
from .tokenizer import WordTokenizer


@dataclass
class Resume:
    """The checkpoint ``--resume`` names, loaded and checked in the launching process."""

    path: Path
    global_step: int
    tokenizer: WordTokenizer
    in_channels: int


def load_resume(cfg: TrainConfig) -> Resume | None:
    """Checks the checkpoint of ``--resume`` (``None`` for a fresh run).

    Everything the ranks will need from it is checked here, so that a bad file stops
    the run before it starts, with a :class:`TrainError` that says what is wrong.
    """
    if cfg.resume is None:
        return None
    path = checkpoint.resolve_resume(cfg.resume, cfg.run_dir)  # --resume comes with --name
    state = checkpoint.load(path)
    try:
        tokenizer = WordTokenizer.from_state_dict(state["tokenizer"])
        config = ModelConfig(**state["model_config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TrainError(f"{path}: its tokenizer or model config is unusable: {exc}") from exc
    if config.loss != cfg.loss:
        raise TrainError(
            f"{path} was trained with --loss {config.loss}; resume it with --loss {config.loss}"
        )
    if config.same_label != cfg.same_label:
        how = _same_label(config.same_label)
        raise TrainError(f"{path} was trained {how}; resume it {how}")
    return Resume(path, state["global_step"], tokenizer, config.in_channels)


def _same_label(value: str | None) -> str:
    return "without --same-label" if value is None else f"with --same-label {value}"


def load_data(cfg: TrainConfig, resume: Resume | None) -> Prepared:
    """The data, tokenised with the checkpoint's vocabulary when resuming."""
    tokenizer = resume.tokenizer if resume else None
    if cfg.train_data is None:
        prepared = prepare_digits(
            cfg.test_fraction, cfg.seed, cfg.context_length, cfg.vocab_size, tokenizer
        )
    else:
        prepared = prepare_csv(
            cfg.train_data,
            cfg.val_data,
            cfg.csv_img_key,
            cfg.csv_caption_key,
            cfg.csv_separator,
            cfg.image_size,
            cfg.max_bad_fraction,
            cfg.seed,
            cfg.context_length,
            cfg.vocab_size,
            tokenizer,
            cfg.label_column,
        )
    if resume is not None and resume.in_channels != prepared.in_channels:
        raise TrainError(
            f"{resume.path} was trained on {resume.in_channels}-channel images, these data "
            f"have {prepared.in_channels} (digits: 1, CSV: 3); resume with the same data"
        )
    return prepared


def report_data(prepared: Prepared) -> None:
    """Says on stderr how many CSV rows were skipped, and why."""
    report = prepared.report
    for split in ("train", "val"):
        info = report.get(split)
        if isinstance(info, dict) and info.get("bad_rows"):
            reasons = ", ".join(f"{n} {r}" for r, n in info["bad_by_reason"].items())
            print(
                f"palmtree train: skipped {info['bad_rows']} of {info['rows']} {split} rows "
                f"({reasons}); first: {'; '.join(info['bad_examples'])}",
                file=sys.stderr,
            )


def open_run_dir(cfg: TrainConfig, resume: Resume | None) -> tuple[TrainConfig, RunLock]:
    """Locks ``<logs>/<name>`` and readies it; returns the settings with the run's name
    (a new folder named after ``--loss`` when ``--name`` is not given) and the lock,
    which the caller releases. Says on stdout where the run goes."""
    if cfg.name is None:
        cfg = replace(cfg, name=new_run_dir(Path(cfg.logs), cfg.loss).name)
    lock = RunLock(cfg.run_dir).acquire()
    step = resume.global_step if resume else None
    try:
        removed = prepare_run_dir(cfg.run_dir, step, cfg.overwrite)
    except BaseException:
        lock.release()
        raise
    if resume is not None:
        where = f"resuming {cfg.run_dir} at step {resume.global_step} from {resume.path}"
    else:
        where = f"a new run in {cfg.run_dir} (--name {cfg.name} --resume continues it)"
        where += f"; --overwrite removed {', '.join(removed)}" if removed else ""
    print(f"palmtree train: {where}", flush=True)
    return cfg, lock
