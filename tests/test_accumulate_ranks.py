"""``palmtree.accumulate`` on 2 spawned gloo ranks: a failure on one rank, in either pass,
reaches both as the same error (never a hang), and leaves each rank as it was.

Rank 0 holds micro-batches of 4 and 6 pairs, rank 1 one of 3 (``MICRO``); a DDP wrapper
that broadcasts buffers (around BatchNorm: rank 0's, before a step's first forward) needs
the same count on every rank: 2 and 2 (``STEP``). A hang shows as the world's timeout.
"""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
from towers import (
    Faulty,
    Towers,
    WithNorm,
    make_loss,
    split,
    state_differences,
    state_of,
    tower_batch,
)
from world import World

import palmtree

MICRO = [[4, 6], [3]]
STEP = [[4, 6], [3, 5]]


def pieces(rank, micro=MICRO):
    sizes = [sum(m) for m in micro]
    ranks = split(tower_batch(sum(sizes)), sizes)
    return split(ranks[rank], micro[rank])


def run_and_report(encode, loss_fn, micro_batches, *modules):
    """accumulate's error message (``None`` if it returned) and the state it changed."""
    for m in modules:  # some gradients already there, as mid-way through a step
        for i, p in enumerate(m.parameters()):
            p.grad = torch.ones_like(p) if i % 2 else None
    before = state_of(*modules)
    try:
        palmtree.accumulate(encode, loss_fn, micro_batches)
    except palmtree.ClipLossInputError as exc:
        return str(exc), state_differences(before, state_of(*modules))
    return None, []


def fault_on_rank(rank, n, bad_rank, what, when, at):
    towers, loss_fn = Towers(dropout=0.2), make_loss("clip", "chunked")
    encode = Faulty(towers, what if rank == bad_rank else None, at=at, when=when, eps=1e-3)
    return run_and_report(encode, loss_fn, pieces(rank), towers, loss_fn)


def entry_error_on_rank(rank, n, bad_rank, what):
    towers, loss_fn = Towers(), make_loss("clip", "chunked")
    encode = towers
    if rank == bad_rank and what == "function":
        encode = lambda *mb: towers(*mb)  # noqa: E731 - a plain function on one rank
    if rank == bad_rank and what == "no_grad":
        with torch.no_grad():
            return run_and_report(encode, loss_fn, pieces(rank), towers, loss_fn)
    return run_and_report(encode, loss_fn, pieces(rank), towers, loss_fn)


def ddp_fault_on_rank(rank, n, bad_rank, when, at):
    """DDP around BatchNorm, which broadcasts rank 0's buffers before the first forward:
    a failure in either pass still reaches both ranks, and each gets its buffers back."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    towers, loss_fn = WithNorm(), make_loss("clip", "chunked")
    encode = DDP(Faulty(towers, "raise" if rank == bad_rank else None, at=at, when=when))
    return run_and_report(encode, loss_fn, pieces(rank, STEP), towers, loss_fn)


def ddp_buffers_on_rank(rank, n):
    """Buffers after two steps of accumulate, and after two steps of DDP's own accumulation
    (``no_sync`` for all but the last micro-batch): DDP broadcasts rank 0's buffers before
    each step's first forward, and each forward updates them once."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = []
    for plain in (False, True):
        towers = WithNorm()
        encode, micro, loss_fn = DDP(towers), pieces(rank, STEP), make_loss("clip", "chunked")
        for _ in range(2):
            if not plain:
                palmtree.accumulate(encode, loss_fn, micro)
                continue
            for k, mb in enumerate(micro):
                sync = encode.no_sync() if k < len(micro) - 1 else contextlib.nullcontext()
                with sync:
                    img, txt, _ = encode(*mb)
                    (img.sum() + txt.sum()).backward()
        out.append({k: b.clone() for k, b in towers.named_buffers()})
    return out


class Centered(Towers):
    """Image features minus a running mean that every forward also updates: a buffer the
    forward reads, so the second pass replays only if it starts from the buffers the first
    encoding saw (rank 0's, once DDP broadcast them), not from this rank's own."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(10))

    def forward(self, pixels, tokens, mask):
        img, txt, mask = super().forward(pixels, tokens, mask)
        out = img - self.mean
        with torch.no_grad():
            self.mean.mul_(0.5).add_(0.5 * img.mean(0))
        return out, txt, mask


def ddp_reads_buffers_on_rank(rank, n, plain):
    from torch.nn.parallel import DistributedDataParallel as DDP

    towers = Centered()
    encode, micro = DDP(towers), pieces(rank, STEP)
    with torch.no_grad():
        towers.mean.fill_(float(rank))  # the ranks disagree until DDP broadcasts rank 0's
    if plain:
        for k, mb in enumerate(micro):
            with encode.no_sync() if k < len(micro) - 1 else contextlib.nullcontext():
                img, txt, _ = encode(*mb)
                (img.sum() + txt.sum()).backward()
    else:
        palmtree.accumulate(encode, make_loss("clip", "chunked"), micro)
    return towers.mean.clone()


def ddp_counts_on_rank(rank, n):
    from torch.nn.parallel import DistributedDataParallel as DDP

    return run_and_report(DDP(WithNorm()), make_loss("clip", "chunked"), pieces(rank))


@pytest.fixture(scope="module")
def world():
    w = World(2, timeout=60.0)
    yield w
    w.close()


def expect_everywhere(results, *words):
    """Both ranks raised the same message, holding ``words``, and changed nothing."""
    messages = [message for message, _ in results]
    assert messages[0] is not None and messages[0] == messages[1], messages
    for w in words:
        assert w in messages[0], messages[0]
    assert [changed for _, changed in results] == [[], []]


@pytest.mark.parametrize(
    "bad,what,when,at,words",
    [
        (1, "raise", 2, 0, "micro-batch 0 (second pass): RuntimeError: simulated failure"),
        (0, "raise", 2, 1, "micro-batch 1 (second pass): RuntimeError: simulated failure"),
        (0, "width", 2, 1, "micro-batch 1 encoded again (second pass) gave image features"),
        (1, "rng", 2, 0, "micro-batch 0 encoded again (second pass) gave image features"),
        (1, "nan", 2, 0, "with NaN or inf"),
    ],
    ids=["raise-rank1", "raise-rank0-mb1", "width", "rng", "nan"],
)
def test_a_second_pass_failure_on_one_rank_raises_on_both(world, bad, what, when, at, words):
    results = world.run(fault_on_rank, bad, what, when, at)
    expect_everywhere(results, f"rank {bad}: ", words)


@pytest.mark.parametrize(
    "what,words", [("function", "encode must be a module"), ("no_grad", "autograd enabled")]
)
def test_an_entry_error_on_one_rank_raises_on_both(world, what, words):
    expect_everywhere(world.run(entry_error_on_rank, 0, what), "rank 0: ", words)


@pytest.mark.parametrize(
    "bad,when,at", [(0, 1, 1), (1, 2, 0), (0, 2, 1)], ids=["pass1", "pass2-rank1", "pass2-mb1"]
)
def test_ddp_broadcasting_buffers_a_failure_in_either_pass_raises_on_both(world, bad, when, at):
    results = world.run(ddp_fault_on_rank, bad, when, at)
    expect_everywhere(results, f"rank {bad}: ", f"micro-batch {at}", "simulated failure")


def test_ddp_broadcasting_buffers_buffers_end_as_ddps_own_accumulation_leaves_them(world):
    for rank, (got, want) in enumerate(world.run(ddp_buffers_on_rank)):
        assert int(got["norm.num_batches_tracked"]) == 4, rank
        for name, value in want.items():
            assert torch.equal(got[name], value), (rank, name)


def test_ddp_broadcasting_buffers_a_forward_that_reads_them_replays(world):
    got, want = (
        world.run(ddp_reads_buffers_on_rank, False),
        world.run(ddp_reads_buffers_on_rank, True),
    )
    for rank in range(2):
        assert torch.equal(got[rank], want[rank]), rank


def test_different_counts_with_buffers_broadcast_name_what_torch_expects(world):
    """torch 2.13 deprecates ``broadcast_buffers`` for ``forward_sync_buffers``."""
    ddp_args = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    new, old = "forward_sync_buffers", "broadcast_buffers"
    flag, deprecated = (new, old) if new in ddp_args else (old, new)
    results = world.run(ddp_counts_on_rank)
    expect_everywhere(results, "different numbers of micro-batches ([2, 1])", f"{flag}=False")
    assert deprecated not in results[0][0]
