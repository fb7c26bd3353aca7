"""Exact gradient accumulation for contrastive losses: global batches beyond activation memory.

Ordinary accumulation is wrong for a contrastive loss (each micro-batch would only see its
own negatives). :func:`accumulate` caches the features instead (GradCache, Gao et al.
2021): it encodes every micro-batch without a graph, computes the loss once on all
cached features of every rank, then re-encodes each micro-batch with a graph and
backpropagates the cached feature gradients into it. Two tower forwards and one tower
backward per micro-batch, one loss; exact, because the loss depends on the towers only
through the features. One room per step: ``features`` (the cache), ``loss_step``,
``replay`` (does the second pass reproduce the first), ``towers`` (its gradients),
``state`` (RNG, buffers, restore on failure), ``ranks`` (agreeing on failures).
docs/accumulate.md holds the guarantees and the reasoning behind them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..distributed import ClipLossInputError
from .features import Layout, concatenate, exchange_shapes, features_of, negatives_of, slices
from .loss_step import LossStep, module_of
from .ranks import Failure, Ranks
from .replay import Replay
from .state import Saved, rng_state, set_rng_state
from .towers import TowerGradients, warn_batch_norm

__all__ = ["accumulate"]


def accumulate(
    encode: Callable, loss_fn: Callable, micro_batches: Sequence[tuple], *, labels=None, group=None
):
    """One optimiser step's gradients for the loss over every micro-batch of every rank.

    Args:
        encode: ``encode(*micro_batch)`` returns ``(image_features, text_features[,
            text_mask])`` for one micro-batch, or ``(image, text, text_mask or None,
            text_negatives)``; typically a DDP-wrapped two-tower model. With several
            ranks, a module (or a bound method of one) on every rank.
        loss_fn: ``loss_fn(image_features, text_features[, text_mask])`` (with
            ``text_negatives=``, ``labels=`` when there are any) returns either a
            palmtree output record (``ClipLoss``/``SigLipLoss`` over the same ``group``) or
            a floating scalar tensor: this rank's value to backpropagate
            (``palmtree.compat.open_clip.ClipLoss``'s, or any loss of your own).
        micro_batches: this rank's micro-batches, tuples of ``encode``'s arguments. Sizes
            may differ; ranks may hold different numbers of them, none included (such a
            rank still calls ``accumulate``), unless a DDP wrapper is about to broadcast
            its buffers (then every rank needs the same number; docs/accumulate.md).
        labels: one ``[b_k]`` integer tensor per micro-batch (:func:`palmtree.clip_loss`'s
            ``labels``), joined in order; ``[]`` on a rank without micro-batches.
        group: the process group of the loss (default: the default group).

    Returns:
        ``loss_fn``'s output (its value detached). Every parameter of ``encode`` and
        ``loss_fn`` then holds, added to what it held, the gradient of the mean over ranks
        of the values ``loss_fn`` returned, as DDP's mean leaves it: for palmtree's losses
        the one loss of the whole accumulated global batch. The towers' gradients (and a
        ``loss_fn``'s that is not DDP-wrapped) are averaged in one all-reduce per call.
        Buffers and the RNG (CPU, every CUDA device) are where one plain forward of the
        micro-batches in order, then the loss, leaves them; dropout masks are replayed.

    Raises:
        ClipLossInputError: the same on every rank, naming the rank(s) and micro-batch,
        for any failure of ``encode`` (either pass) or ``loss_fn`` on any rank, or a
        second pass that does not reproduce the first (docs/accumulate.md). Then every
        ``.grad``, buffer and RNG state is as it was before the call.

    Not exact: BatchNorm's batch statistics in training mode (a warning says so) come from
    each micro-batch, not the global batch, as in any accumulation.
    """
    micro_batches = list(micro_batches)
    warn_batch_norm(encode)
    ranks = Ranks(group)
    tower = TowerGradients(encode, ranks)
    entry = tower.error or _grad_mode_error()
    if tower.broadcasts_buffers:
        ranks.agree_at_entry(len(micro_batches), entry)
    elif entry is not None and ranks.size == 1:
        raise ClipLossInputError(entry)
    entry = entry or _labels_error(labels, micro_batches)
    saved = Saved(tower, module_of(loss_fn))
    try:
        return _accumulate(encode, loss_fn, micro_batches, tower, saved, entry, labels)
    except BaseException:
        tower.put_back()
        saved.restore()
        raise


def _grad_mode_error() -> str | None:
    if torch.is_grad_enabled():
        return None
    return (
        "accumulate computes gradients: call it with autograd enabled, not under "
        "torch.no_grad() or torch.inference_mode()"
    )


def _labels_error(labels, micro_batches) -> str | None:
    if labels is None or len(labels) == len(micro_batches):
        return None
    return f"labels holds {len(labels)} tensors for {len(micro_batches)} micro-batches"


def _all_labels(labels, layout) -> torch.Tensor | None:
    """Every micro-batch's labels in order (an empty ``[0]`` for a rank without any)."""
    if labels is None:
        return None
    if not len(labels):
        return torch.empty(0, dtype=torch.long, device=layout.device)
    return torch.cat([torch.as_tensor(y, device=layout.device) for y in labels])


def _accumulate(encode, loss_fn, micro_batches, tower, saved, entry, labels):
    with saved.towers.watch(tower.inner):
        states, cached, failure = _first_pass(encode, micro_batches, entry)
    layout = exchange_shapes(cached, failure, tower.ranks)  # raises on every rank
    saved.towers.rewind()
    step = LossStep(loss_fn, tower.ranks)
    batch = concatenate(cached, layout)
    failure = step.run(batch, negatives_of(cached, layout), _all_labels(labels, layout))
    after = rng_state()
    if failure is None:
        grads = step.feature_grads
        failure = _second_pass(encode, micro_batches, states, cached, grads, layout, tower)
    tower.finish(step.params, step.grads, failure)  # raises on every rank
    saved.finish(after)
    return step.result()


def _first_pass(encode, micro_batches, entry):
    """Encodes without a graph, remembering the RNG state each encoding started from."""
    states, cached = [], []
    if entry is not None:
        return states, cached, Failure(entry)
    for k, mb in enumerate(micro_batches):
        states.append(rng_state())
        try:
            with torch.no_grad():
                cached.append(features_of(encode(*mb)))
        except Exception as exc:  # reported on every rank by the exchange of shapes
            message = f"encode failed on micro-batch {k}: {type(exc).__name__}: {exc}"
            return states, cached, Failure(message, exc)
    return states, cached, None


def _second_pass(encode, micro_batches, states, cached, feature_grads, layout: Layout, tower):
    """Re-encodes each micro-batch with a graph, from its saved RNG state, checks it against
    the cache and backpropagates its slice of the feature gradients; this rank's failure.
    No rank waits for another here: the first collective after it is the agreement."""
    replay = Replay(tower.ranks.rank)
    with tower.no_sync():
        for k, (mb, state) in enumerate(zip(micro_batches, states, strict=True)):
            doing = "encode failed on"
            try:
                set_rng_state(state)
                features = features_of(encode(*mb))
                why = replay.check(features, cached[k], k)
                if why is not None:
                    return Failure(why)
                doing = "the backward failed for"
                tower.add(features, slices(feature_grads, cached, k, layout))
            except Exception as exc:
                message = f"{doing} micro-batch {k} (second pass): {type(exc).__name__}: {exc}"
                return Failure(message, exc)
    why = replay.verdict()
    return None if why is None else Failure(why)
