"""What one case of ``benchmarks/accumulate.py`` runs and measures: the demo's towers and
loss, random inputs of the digits' shapes, one training step ``plain`` or through
``palmtree.accumulate``, and the peak memory and time of its steps (:func:`run_case`)."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

import palmtree
from palmtree.bench.measure import PeakMemory, is_oom, limit_address_space, one_line
from palmtree.train.models import DualEncoder, ModelConfig

#: What a step is: one pass over the whole global batch, or ``palmtree.accumulate``.
MODES = ("plain", "accumulate")
#: The longest caption, in words: the digits' training captions have 1 to 9.
MAX_WORDS = 9


@dataclass(frozen=True)
class Case:
    """One measurement (JSON-serialisable, for the worker process)."""

    mode: str
    global_batch: int
    micro_batch: int
    steps: int
    warmup: int
    seed: int = 0
    mem_limit_mb: int | None = None
    threads: int | None = None


def make_model(seed: int) -> DualEncoder:
    """The demo's towers and loss: ``ModelConfig``'s defaults (those of ``palmtree train``
    on the digits), the ``chunked`` backend."""
    torch.manual_seed(seed)
    return DualEncoder(ModelConfig(backend="chunked"))


def make_batch(size: int, seed: int):
    """``size`` random 8x8 images in [-1, 1] and random captions: token ids uniform over
    the vocabulary, lengths uniform in 1..``MAX_WORDS``, padded with 0."""
    config = ModelConfig()
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(size, config.in_channels, 8, 8, generator=g) * 2 - 1
    ids = torch.randint(1, config.vocab_size, (size, MAX_WORDS), generator=g)
    lengths = torch.randint(1, MAX_WORDS + 1, (size, 1), generator=g)
    mask = torch.arange(MAX_WORDS) < lengths
    return images, ids * mask, mask


class Towers(nn.Module):
    """``accumulate``'s ``encode``: the model's two towers, the loss left out."""

    def __init__(self, model: DualEncoder):
        super().__init__()
        self.image, self.text = model.image, model.text

    def forward(self, images, ids, mask):
        return self.image(images), self.text(ids, mask), mask


def gradients(case: Case, model: DualEncoder, batch) -> torch.Tensor:
    """The step's gradients by ``case.mode``; returns the (detached) loss."""
    if case.mode == "plain":
        out = model(*batch)
        out.loss.backward()
        return out.loss.detach()
    micro = micro_batches(batch, case.micro_batch)
    return palmtree.accumulate(Towers(model), model.loss_fn, micro).loss


def micro_batches(batch: tuple, size: int) -> list[tuple]:
    """The global batch's consecutive slices of ``size`` pairs (the last may be smaller)."""
    return [tuple(x[i : i + size] for x in batch) for i in range(0, len(batch[0]), size)]


def features_mb(batch, config: ModelConfig) -> float:
    """The cached features of the global batch: image ``[B, image_dim]`` and text token
    latents ``[B, L, text_width]``, fp32 (what ``accumulate`` keeps besides one
    micro-batch's activations, the ``O(B x D)`` term)."""
    big, length = batch[1].shape
    return big * (config.image_dim + length * config.text_width) * 4 / 2**20


# --------------------------------------------------------------------------- one case


def run_case(case: Case) -> dict:
    """Measures one case in this process; ``status`` ``ok`` or ``oom``."""
    if case.threads:
        torch.set_num_threads(case.threads)
    model = make_model(case.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = make_batch(case.global_batch, case.seed)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = gradients(case, model, batch)
        optimizer.step()
        return loss

    # A small step's gradients first (no optimiser step: the parameters stay those of the
    # seed), so that thread pools and other lazy state are not counted as the step's.
    small = Case(**dict(asdict(case), global_batch=min(8, case.global_batch), micro_batch=4))
    gradients(small, model, make_batch(small.global_batch, case.seed + 1))

    result = dict(features_mb=features_mb(batch, model.config), tokens=batch[1].shape[1])
    memory = PeakMemory(torch.device("cpu"))
    if case.mem_limit_mb:
        limit_address_space(case.mem_limit_mb)
    memory.start()
    times, first = [], None
    try:
        for i in range(case.warmup + case.steps):
            t0 = time.perf_counter()
            loss = step()
            if i >= case.warmup:
                times.append((time.perf_counter() - t0) * 1e3)
            first = float(loss) if first is None else first
    except Exception as exc:  # running out of memory is a result
        if not is_oom(exc):
            raise
        return dict(result, status="oom", note=one_line(exc))
    return dict(
        result,
        status="ok",
        note="",
        steps=len(times),
        median_ms=statistics.median(times),
        min_ms=min(times),
        peak_mb=memory.peak_mb(),
        loss=first,
    )
