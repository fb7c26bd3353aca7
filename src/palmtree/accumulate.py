"""Exact gradient accumulation for contrastive losses: global batches beyond activation memory.

Ordinary accumulation is wrong for a contrastive loss (each micro-batch would only see its
own negatives). :func:`accumulate` caches the features instead (GradCache, Gao et al.
2021): it encodes every micro-batch without a graph, computes the loss once on all
cached features of every rank, then re-encodes each micro-batch with a graph and
backpropagates the cached feature gradients into it. Two tower forwards and one tower
backward per micro-batch, one loss; exact, because the loss depends on the towers only
through the features.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .distributed import ClipLossInputError, world


def accumulate(
    encode: Callable,
    loss_fn: Callable,
    micro_batches: Sequence[tuple],
    *,
    group=None,
):
    """One optimiser step's gradients for the loss over every micro-batch of every rank.

    Args:
        encode: ``encode(*micro_batch)`` returns ``(image_features, text_features)`` or
            ``(image_features, text_features, text_mask)`` for one micro-batch;
            typically a DDP-wrapped two-tower model.
        loss_fn: ``loss_fn(image_features, text_features[, text_mask])`` returns the
            output record of a palmtree loss (a ``ClipLoss``/``SigLipLoss`` module, or a
            function around ``clip_loss``/``siglip_loss``) over the same ``group``.
        micro_batches: this rank's micro-batches, tuples of ``encode``'s arguments. Sizes
            may differ; ranks may hold different numbers of them, none included (such a
            rank still calls ``accumulate``).
        group: the process group of the loss (default: the default group).

    Returns:
        The loss's output record over the whole accumulated global batch, ``loss``
        detached. When this returns, every parameter reached by ``encode`` and ``loss_fn``
        holds the gradient of that one loss as DDP's mean leaves it. The towers' gradients
        are averaged over ``group`` in one all-reduce per call (a DDP-wrapped ``encode``
        re-encodes under ``no_sync``: its reducer's all-reduce, tied to a backward, would
        wait for ranks that have fewer micro-batches); so are those of a ``loss_fn`` that
        is not DDP-wrapped (temperature, bias, projections).

    Randomness (dropout): each micro-batch's CPU and CUDA RNG states are saved before its
    first encoding and restored for the second, so the gradient equals that of a plain
    forward of the micro-batches in order. Not exact: layers whose output depends on the
    other samples of the micro-batch (BatchNorm's batch statistics in training mode; a
    warning says so) see micro-batches instead of the global batch, as in any
    accumulation.
    """
    micro_batches = list(micro_batches)
    _warn_batch_norm(encode)
    _, world_size = world(group)
    tower = _TowerGradients(encode, group, world_size)
    tower.check_buffers(len(micro_batches))

    # Pass 1: encode without a graph, remembering the RNG state each encoding started from.
    states, cached, error = [], [], None
    for mb in micro_batches:
        states.append(_rng_state())
        try:
            with torch.no_grad():
                cached.append(_features(encode(*mb)))
        except Exception as exc:  # reported on every rank by the exchange below
            error = f"encode failed on micro-batch {len(cached)}: {type(exc).__name__}: {exc}"
            break
    layout = _exchange_shapes(cached, error, group, world_size)

    # The loss, once, on every rank's cached features (leaves that collect their gradients).
    batch = _concatenate(cached, layout)
    leaves = [x.detach().requires_grad_() if x.is_floating_point() else x for x in batch]
    out = loss_fn(*leaves)
    feature_grads = _loss_backward(out.loss, leaves[:2], loss_fn, group, world_size)

    # Pass 2: re-encode each micro-batch with a graph, from its saved RNG state, and
    # backpropagate its slice of the cached feature gradients.
    after = _rng_state()
    tower.remember_gradients()
    with tower.no_sync():
        for k, (mb, state) in enumerate(zip(micro_batches, states, strict=True)):
            _set_rng_state(state)
            features = _features(encode(*mb))
            tower.backward(features, _slices(feature_grads, cached, k, layout))
    tower.average()
    _set_rng_state(after)
    out.loss = out.loss.detach()
    return out


@dataclass
class _Layout:
    """What every rank's features look like: the dims and dtypes of the two sides, the
    device, whether texts are token latents (with a mask) and their longest length here."""

    image_dim: int
    text_dim: int
    image_dtype: torch.dtype
    text_dtype: torch.dtype
    tokens: bool
    length: int
    device: torch.device


def _features(out) -> tuple:
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
        raise TypeError(
            "encode must return (image_features, text_features) or (image_features, "
            f"text_features, text_mask), got {type(out).__name__}"
        )
    return tuple(out)


def _exchange_shapes(cached, error, group, world_size) -> _Layout:
    """Every rank learns the features' shapes (a rank without micro-batches needs them to
    pass empty ones) and every rank's encoding errors, in one small exchange."""
    mine = None
    if cached and error is None:
        img, txt = cached[0][:2]
        mine = (img.shape[-1], txt.shape[-1], img.dtype, txt.dtype, txt.dim() == 3, img.device)
        if any(
            (c[0].shape[-1], c[1].shape[-1], c[1].dim() == 3) != (mine[0], mine[1], mine[4])
            for c in cached
        ):
            error = "micro-batches give features of different widths or forms"
    entries = [(mine, error)]
    if world_size > 1:
        entries = [None] * world_size
        dist.all_gather_object(entries, (mine, error), group=group)
    errors = [f"rank {r}: {e}" for r, (_, e) in enumerate(entries) if e is not None]
    if errors:
        raise ClipLossInputError("; ".join(errors) if world_size > 1 else entries[0][1])
    shapes = [m for m, _ in entries if m is not None]
    if not shapes:
        raise ClipLossInputError("the global batch is empty: no rank has a micro-batch")
    dims = mine or shapes[0]
    length = max((c[1].shape[1] for c in cached), default=1) if dims[4] else 0
    device = mine[5] if mine else _default_device(dims[5])
    return _Layout(dims[0], dims[1], dims[2], dims[3], dims[4], length, device)


def _default_device(other: torch.device) -> torch.device:
    """A device like another rank's, on this rank (its own CUDA device)."""
    if other.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return other


def _concatenate(cached, layout: _Layout) -> list[torch.Tensor]:
    """This rank's micro-batches as one batch; token latents padded to the longest (mask 0)."""
    kw = dict(device=layout.device)
    if not cached:
        img = torch.empty(0, layout.image_dim, dtype=layout.image_dtype, **kw)
        if not layout.tokens:
            return [img, torch.empty(0, layout.text_dim, dtype=layout.text_dtype, **kw)]
        txt = torch.empty(0, 1, layout.text_dim, dtype=layout.text_dtype, **kw)
        return [img, txt, torch.empty(0, 1, dtype=torch.long, **kw)]
    img = torch.cat([c[0] for c in cached])
    if not layout.tokens:
        return [img, torch.cat([c[1] for c in cached])]
    pad = layout.length
    txt = torch.cat([nn.functional.pad(c[1], (0, 0, 0, pad - c[1].shape[1])) for c in cached])
    mask = torch.cat([nn.functional.pad(_mask(c), (0, pad - c[1].shape[1])) for c in cached])
    return [img, txt, mask]


def _mask(c) -> torch.Tensor:
    if len(c) < 3 or c[2] is None:
        raise ClipLossInputError("encode returned token latents [b, L, D] without a text_mask")
    return c[2].long() if c[2].dtype == torch.bool else c[2]


def _slices(feature_grads, cached, k: int, layout: _Layout) -> tuple:
    """Micro-batch ``k``'s rows of the cached gradients (its own token length)."""
    start = sum(c[0].shape[0] for c in cached[:k])
    stop = start + cached[k][0].shape[0]
    img, txt = (g[start:stop] for g in feature_grads)
    if layout.tokens:
        txt = txt[:, : cached[k][1].shape[1]]
    return img, txt


def _loss_backward(loss, features, loss_fn, group, world_size: int) -> tuple:
    """The loss's gradients w.r.t. the cached features; its own parameters' gradients go
    into their ``.grad`` (averaged over ranks here unless a DDP wrapper does it)."""
    module = _module_of(loss_fn)
    if isinstance(module, nn.parallel.DistributedDataParallel):
        loss.backward()
        grads = [f.grad for f in features]
    else:
        if module is not None:  # the same parameters, in the same order, on every rank
            own = [p for p in module.parameters() if p.requires_grad]
        else:
            own = _leaf_parameters([loss], exclude=features)
        grads = torch.autograd.grad(loss, list(features) + own, allow_unused=True)
        _average_into(own, grads[len(features) :], group, world_size)
    # A side the loss did not use sends its micro-batches a zero gradient.
    pairs = zip(features, grads[: len(features)], strict=True)
    return tuple(torch.zeros_like(f) if g is None else g for f, g in pairs)


def _leaf_parameters(outputs, exclude=()) -> list[torch.Tensor]:
    """The leaf tensors that require grad behind ``outputs``, in the order a walk of their
    autograd graph meets them (the same order on every rank running the same code)."""
    skip = {id(x) for x in exclude}
    found, seen, todo = [], set(), [o.grad_fn for o in outputs]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and variable.requires_grad and id(variable) not in skip:
            skip.add(id(variable))
            found.append(variable)
        todo.extend(fn for fn, _ in node.next_functions)
    return found


def _module_of(fn) -> nn.Module | None:
    """``fn`` itself when it is a module, the module of a bound method, else ``None``."""
    target = getattr(fn, "__self__", fn)
    return target if isinstance(target, nn.Module) else None


def _average_into(params, grads, group, world_size: int) -> None:
    """``param.grad += mean over ranks of grad`` for each parameter (one all-reduce)."""
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    if world_size > 1 and grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat /= world_size
        grads = list(flat.split([g.numel() for g in grads]))
    for p, g in zip(params, grads, strict=True):
        g = g.view_as(p)
        p.grad = g.clone() if p.grad is None else p.grad + g


class _TowerGradients:
    """The second pass's backward into ``encode``, and the one all-reduce that averages
    what it added to the towers' gradients over the ranks.

    A DDP-wrapped ``encode`` runs every re-encoding under ``no_sync`` and is averaged here
    instead of by its reducer: ranks may hold different numbers of micro-batches (none
    included), and DDP's own all-reduce, tied to a backward, would wait for the missing ones.
    """

    def __init__(self, encode, group, world_size: int):
        module = _module_of(encode)
        self.ddp = module if isinstance(module, nn.parallel.DistributedDataParallel) else None
        self.group, self.world_size = group, world_size
        self.params: list[torch.Tensor] = []
        self.before: list[torch.Tensor | None] = []
        if world_size > 1:
            if module is None:
                raise TypeError(
                    "with several ranks, encode must be a module (DDP-wrapped or not) or a "
                    "bound method of one, so that its parameters' gradients can be averaged"
                )
            inner = self.ddp.module if self.ddp is not None else module
            self.params = [p for p in inner.parameters() if p.requires_grad]

    def check_buffers(self, count: int) -> None:
        """DDP broadcasts buffers in every forward: then every rank needs the same count of
        micro-batches, or the broadcasts would wait on each other."""
        if self.ddp is None or self.world_size == 1 or not self.ddp.will_sync_module_buffers():
            return
        counts = [None] * self.world_size
        dist.all_gather_object(counts, count, group=self.group)
        if len(set(counts)) > 1:
            raise ClipLossInputError(
                f"ranks hold different numbers of micro-batches ({counts}) and the DDP model "
                "broadcasts its buffers in every forward; wrap it with "
                "DistributedDataParallel(..., broadcast_buffers=False) or give every rank "
                "the same number"
            )

    def remember_gradients(self) -> None:
        """What the towers' ``.grad`` hold before the second pass adds to them."""
        self.before = [None if p.grad is None else p.grad.clone() for p in self.params]

    def no_sync(self):
        return self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()

    def backward(self, features, grads) -> None:
        pairs = [(f, g) for f, g in zip(features[:2], grads, strict=False) if f.requires_grad]
        torch.autograd.backward([f for f, _ in pairs], [g for _, g in pairs])

    def average(self) -> None:
        """Averages what the second pass added to the towers' gradients over the ranks."""
        if not self.params:
            return
        added = []
        for p, before in zip(self.params, self.before, strict=True):
            grad = torch.zeros_like(p) if p.grad is None else p.grad
            added.append(grad if before is None else grad - before)
            p.grad = before
        _average_into(self.params, added, self.group, self.world_size)


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _warn_batch_norm(encode) -> None:
    module = getattr(encode, "__self__", encode)
    if not isinstance(module, nn.Module):
        return
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if any(m.training for m in norms):
        warnings.warn(
            "accumulate: encode holds BatchNorm layers in training mode; their batch "
            "statistics come from each micro-batch, not the global batch, so the gradient "
            "is not the one of a single large batch (use LayerNorm, or eval-mode BatchNorm)",
            UserWarning,
            stacklevel=3,
        )
