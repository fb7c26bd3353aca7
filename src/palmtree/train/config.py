"""The settings of one ``palmtree train`` run, parsed from its flags once (:mod:`.options`),
and the place of a rank in it.

:class:`TrainConfig` is frozen: the launcher, every rank and the checkpoint read the same
values, and nothing changes them on the way. Its field defaults are the flags' defaults.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

#: ``--precision``: how the towers run (autocast), not the matmul operand precision of
#: the loss (``palmtree.precision.PRECISIONS``); the loss is fp32 inside in every mode.
AUTOCAST_MODES = ("fp32", "amp_bf16", "amp")
AUTOCAST_DTYPES = {"fp32": None, "amp_bf16": torch.bfloat16, "amp": torch.float16}


@dataclass(frozen=True)
class TrainConfig:
    """Every flag of ``palmtree train``, checked (see :func:`.options.parse_config`)."""

    # data
    train_data: str | None = None  # None: scikit-learn's digits
    val_data: str | None = None
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = "\t"
    label_column: str | None = None  # CSV: the column of integer item ids (--same-label)
    image_size: int = 32
    max_bad_fraction: float = 0.1
    test_fraction: float = 0.2
    workers: int = 0
    # training
    loss: str = "clip"
    batch_size: int = 64  # pairs per rank and micro-batch
    accum_steps: int = 1  # micro-batches per rank and optimiser step
    epochs: int = 20
    lr: float = 2e-3
    wd: float = 0.1
    warmup: int = 20
    precision: str = "fp32"
    seed: int = 0
    max_steps: int | None = None
    same_label: str | None = None  # None: no labels; "positive" or "ignore" (SAME_LABEL)
    # model
    image_width: int = 32
    image_dim: int = 128
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    embed_dim: int = 64
    context_length: int = 32
    vocab_size: int = 10000
    # run
    backend: str = "auto"
    nproc: int = 2
    logs: str = "runs"
    name: str | None = None  # None: a new folder, chosen by .prepare.open_run_dir
    overwrite: bool = False  # a fresh run may replace the run already in --name
    resume: str | None = None  # "latest" or a checkpoint's path
    progress: bool = True

    @property
    def run_dir(self) -> Path:
        """``<logs>/<name>``; only once the name is known (the launcher chooses one
        when ``--name`` is not given, before any rank starts)."""
        if self.name is None:
            raise RuntimeError("the run folder is not chosen yet (see prepare.open_run_dir)")
        return Path(self.logs) / self.name

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The towers' autocast dtype (``None``: fp32, no autocast)."""
        return AUTOCAST_DTYPES[self.precision]

    def flags(self) -> dict[str, int | float | str]:
        """The numbers and strings among the settings, as a checkpoint records them."""
        return {k: v for k, v in asdict(self).items() if isinstance(v, (int, float, str))}


@dataclass(frozen=True)
class RankContext:
    """Where this rank runs: its place in the world, its device and how it was started."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str  # "spawn", "torchrun" or "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, which writes the run's files."""
        return self.rank == 0
