"""What ``accumulate`` leaves behind: RNG states, module buffers, and, on failure, every
``.grad`` it may have touched as it found them.

On success the RNG and the towers' buffers are where one plain forward of the micro-batches
in order (then the loss) leaves them: the first pass's, although the second pass replayed
it. On failure, RNG, buffers and the gradients a DDP-wrapped loss wrote are put back as they
were before the call (every other ``.grad`` is only written once every rank has succeeded).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def rng_state() -> tuple:
    """The CPU generator's state and every CUDA device's (once CUDA is initialised)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class Buffers:
    """Copies of a module's buffers (its submodules' included), to put back in place."""

    def __init__(self, module: nn.Module | None):
        self.slots = []
        if module is not None:
            for owner in module.modules():
                self.slots += [(owner, n) for n, b in owner._buffers.items() if b is not None]
        self.entry = self._copy()
        self.start = self.first_pass = None

    @contextlib.contextmanager
    def watch(self, module: nn.Module | None):
        """Records the buffers as ``module``'s first forward sees them: after the broadcast
        of rank 0's buffers that a DDP wrapper may make before it."""

        def record(*_):
            if self.start is None:
                self.start = self._copy()

        handle = None if module is None else module.register_forward_pre_hook(record)
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    def _copy(self) -> list[torch.Tensor]:
        return [owner._buffers[name].detach().clone() for owner, name in self.slots]

    def load(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for (owner, name), value in zip(self.slots, values, strict=True):
                now = owner._buffers.get(name)
                if now is not None and now.shape == value.shape and now.dtype == value.dtype:
                    now.copy_(value)  # in place: DDP and optimisers may hold the tensor
                else:
                    owner._buffers[name] = value.clone()

    def rewind(self) -> None:
        """After the first pass: keep its buffers for the end, and start the second pass
        from those the first encoding saw (the entry values, or rank 0's when DDP
        broadcast them), so that it replays what the first pass computed."""
        self.first_pass = self._copy()
        self.load(self.entry if self.start is None else self.start)


class Saved:
    """The state at entry, for :meth:`restore` on failure or :meth:`finish` on success."""

    def __init__(self, tower, loss: nn.Module | None):
        self.rng = rng_state()
        self.towers = Buffers(tower.module)
        self.loss = Buffers(loss if loss is not tower.module else None)
        self.ddp = tower.ddp
        self.ddp_sync = None if tower.ddp is None else tower.ddp.require_forward_param_sync
        self.grads = []
        if isinstance(loss, nn.parallel.DistributedDataParallel):  # its reducer writes .grad
            params = [p for p in loss.parameters() if p.requires_grad]
            self.grads = [(p, None if p.grad is None else p.grad.clone()) for p in params]

    def finish(self, rng_after_loss: tuple) -> None:
        self.towers.load(self.towers.first_pass)
        set_rng_state(rng_after_loss)
        if self.ddp is not None:
            # As after the last, synced, forward of DDP's own accumulation: the next forward
            # broadcasts rank 0's buffers (DDP stops after forwards without grad or sync).
            self.ddp.require_forward_param_sync = self.ddp.require_backward_grad_sync

    def restore(self) -> None:
        set_rng_state(self.rng)
        if self.ddp is not None:
            self.ddp.require_forward_param_sync = self.ddp_sync
        self.towers.load(self.towers.entry)
        self.loss.load(self.loss.entry)
        for p, grad in self.grads:
            if grad is None or p.grad is None:
                p.grad = grad
            else:
                p.grad.copy_(grad)
