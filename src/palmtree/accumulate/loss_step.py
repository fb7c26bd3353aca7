"""The loss, once, on every rank's cached features: its value, the features' gradients, and
its own parameters' gradients (kept aside until every rank has finished the second pass)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..distributed import ClipLossInputError
from .ranks import Failure, Ranks


def module_of(fn) -> nn.Module | None:
    """``fn`` itself when it is a module, the module of a bound method, else ``None``."""
    target = getattr(fn, "__self__", fn)
    return target if isinstance(target, nn.Module) else None


def leaf_parameters(outputs, exclude=()) -> list[torch.Tensor]:
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


def loss_value(out) -> torch.Tensor:
    """What this rank backpropagates: ``out`` itself (a scalar tensor) or ``out.loss`` (a
    palmtree output record); TypeError naming what ``loss_fn`` must return otherwise."""
    value = out if isinstance(out, torch.Tensor) else getattr(out, "loss", None)
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
        got = type(out).__name__
        if isinstance(value, torch.Tensor):
            got = f"a {value.dtype} tensor of shape {tuple(value.shape)}"
        raise TypeError(
            "loss_fn must return a floating scalar tensor (this rank's value to backpropagate) "
            f"or an output record with one as .loss (palmtree's ClipLoss, SigLipLoss), got {got}"
        )
    if not value.requires_grad:
        raise TypeError(
            "loss_fn returned a value that does not require grad: it depends on neither the "
            "features it was given nor any parameter"
        )
    return value


class LossStep:
    """Calls ``loss_fn`` on the cached features, as leaves that collect their gradients.

    A DDP-wrapped ``loss_fn`` runs its own backward (its reducer averages its parameters'
    gradients into their ``.grad``). Otherwise the gradients of its parameters (a module's,
    or the leaves its value depends on) are computed here and kept in ``params``/``grads``,
    for :class:`~.towers.TowerGradients` to average and add once every rank has succeeded.
    """

    def __init__(self, loss_fn, ranks: Ranks):
        self.loss_fn, self.ranks = loss_fn, ranks
        self.module = module_of(loss_fn)
        self.ddp = isinstance(self.module, nn.parallel.DistributedDataParallel)
        self.out = self.value = self.feature_grads = None
        self.params: list[torch.Tensor] = []
        self.grads: list[torch.Tensor | None] = []

    def run(self, batch: list[torch.Tensor], negatives=None, labels=None) -> Failure | None:
        """The loss and its gradients, or this rank's failure. The loss's own input errors
        (:class:`ClipLossInputError`, raised on every rank by palmtree's losses) propagate.
        ``negatives`` and ``labels`` reach ``loss_fn`` as ``text_negatives=`` and
        ``labels=`` when given; the negatives' gradient follows the features'."""
        leaves = [x.detach().requires_grad_() if x.is_floating_point() else x for x in batch]
        kwargs, differentiable = {}, leaves[:2]
        if negatives is not None:
            kwargs["text_negatives"] = negatives.detach().requires_grad_()
            differentiable = [*differentiable, kwargs["text_negatives"]]
        if labels is not None:
            kwargs["labels"] = labels
        try:
            self.out = self.loss_fn(*leaves, **kwargs)
            self.value = loss_value(self.out)
            grads = self._backward(differentiable)
        except ClipLossInputError:
            raise
        except Exception as exc:  # reported on every rank once the second pass is over
            return Failure(f"loss_fn failed: {type(exc).__name__}: {exc}", exc)
        # A side the loss did not use sends its micro-batches a zero gradient.
        pairs = zip(differentiable, grads, strict=True)
        self.feature_grads = tuple(torch.zeros_like(f) if g is None else g for f, g in pairs)
        return None

    def _backward(self, features) -> list:
        if self.ddp:
            self.value.backward()
            return [f.grad for f in features]
        if self.module is not None:  # the same parameters, in the same order, on every rank
            self.params = [p for p in self.module.parameters() if p.requires_grad]
        else:
            self.params = leaf_parameters([self.value], exclude=features)
        grads = torch.autograd.grad(self.value, list(features) + self.params, allow_unused=True)
        self.grads = list(grads[len(features) :])
        return list(grads[: len(features)])

    def result(self):
        """What ``accumulate`` returns: ``loss_fn``'s output, its value detached."""
        value = self.value.detach()
        if isinstance(self.out, torch.Tensor):
            return value
        if dataclasses.is_dataclass(self.out):
            return dataclasses.replace(self.out, loss=value)
        self.out.loss = value
        return self.out
