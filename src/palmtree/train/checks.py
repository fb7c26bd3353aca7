"""What is wrong with a combination of ``palmtree train``'s flags, found before anything
starts (:func:`.options.parse_config` reports it as argparse does, exit status 2)."""

from __future__ import annotations

import os

import torch

from ..backends import fused_can_run
from ..distributed import launched_world
from .config import TrainConfig


def flag_problem(c: TrainConfig) -> str | None:
    """What is wrong with a combination of flags, or ``None``."""
    if not 0 < c.test_fraction < 1:
        return f"--test-fraction must be in (0, 1), got {c.test_fraction}"
    if c.train_data is None and c.val_data is not None:
        return "--val-data needs --train-data (the digits hold out their own test split)"
    for flag, path in (("--train-data", c.train_data), ("--val-data", c.val_data)):
        if path is not None and not os.path.isfile(path):
            return f"{flag}: no such file: {path}"
    problem = _label_problem(c)
    if problem:
        return problem
    if c.text_width % c.text_heads:
        return f"--text-width {c.text_width} must be divisible by --text-heads {c.text_heads}"
    problem = _run_folder_problem(c)
    if problem:
        return problem
    if c.precision == "amp" and c.accum_steps > 1:
        # The GradScaler scales the loss before its backward; palmtree.accumulate runs
        # that backward itself, so fp16 gradients would go unscaled.
        return "--precision amp cannot be combined with --accum-steps > 1; use amp_bf16"
    on_gpu = _ranks_use_cuda()
    if c.precision == "amp" and not on_gpu:
        return "--precision amp (fp16) needs CUDA ranks (torchrun on GPUs); use amp_bf16 or fp32"
    if c.backend == "fused" and not fused_can_run(torch.device("cuda" if on_gpu else "cpu")):
        return (
            "--backend fused needs CUDA ranks (torchrun on GPUs) and Triton; the spawned "
            "ranks run on CPU: use --backend auto or chunked"
        )
    return None


def _label_problem(c: TrainConfig) -> str | None:
    """``--same-label`` and ``--label-column``: the CSV labels come from a column, the
    digits' are their classes."""
    if c.label_column is not None and c.train_data is None:
        return (
            "--label-column names a column of --train-data (the digits' labels are their classes)"
        )
    if c.label_column is not None and c.same_label is None:
        return "--label-column gives the labels of --same-label positive|ignore: give it too"
    if c.same_label is not None and c.train_data is not None and c.label_column is None:
        return "--same-label with --train-data needs --label-column NAME, a column of integer ids"
    return None


def _run_folder_problem(c: TrainConfig) -> str | None:
    if c.resume is not None and c.name is None:
        return "--resume continues the run in <logs>/<name>: give its --name"
    if c.overwrite and (c.name is None or c.resume is not None):
        return "--overwrite replaces the run of --name with a fresh one: give --name, not --resume"
    if c.name is not None and (not c.name or os.sep in c.name or c.name in (".", "..")):
        return f"--name must be a plain folder name, got {c.name!r}"
    paths = [("--logs", c.logs)]
    if c.name is not None:
        paths.append(("--name", os.path.join(c.logs, c.name)))
    for flag, path in paths:
        if os.path.exists(path) and not os.path.isdir(path):
            return f"{flag}: {path} is a file; the run folder must be a directory"
    return None


def _ranks_use_cuda() -> bool:
    """Spawned ranks run on CPU; torchrun ranks use CUDA when there is one."""
    return launched_world() and torch.cuda.is_available()
