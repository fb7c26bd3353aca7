"""``palmtree.accumulate`` on spawned gloo ranks: the gradients of one big batch.

A DDP-wrapped two-tower model with dropout, K micro-batches per rank (uneven sizes and
counts, an empty rank) on 1..3 ranks: every parameter's gradient, the temperature's and
the bias's included, must be that of one process on the whole global batch in float64
(:func:`towers.check_gradients`), with the dropout masks a plain forward of each rank's
micro-batches in order would draw.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from towers import Towers, check_gradients, gradients, make_loss, split, tower_batch
from world import World

import palmtree
from palmtree.compat.open_clip import ClipLoss as ClipLossCompat

#: Micro-batch sizes per rank, for each world size: uneven, different counts, one empty.
MICRO = {1: [[5, 3, 7]], 2: [[4, 6], [3]], 3: [[2, 5], [], [6, 1, 3]]}
SEEDS = [11, 12, 13]


def pieces_of(n):
    sizes = [sum(m) for m in MICRO[n]]
    ranks = split(tower_batch(sum(sizes)), sizes)
    return [split(rank, micro) for rank, micro in zip(ranks, MICRO[n], strict=True)]


def accumulate_on_rank(rank, n, kind, backend, dropout, wrap=True):
    """This rank's micro-batches through ``accumulate`` with DDP-wrapped (or plain) towers
    and a plain loss module; returns the parameter gradients and the global batch size."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    towers = Towers(dropout)
    encode = DDP(towers) if wrap else towers
    loss_fn = make_loss(kind, backend)
    torch.manual_seed(SEEDS[rank])
    out = palmtree.accumulate(encode, loss_fn, pieces_of(n)[rank])
    grads = {f"towers.{k}": p.grad for k, p in towers.named_parameters()}
    grads.update({f"loss.{k}": p.grad for k, p in loss_fn.named_parameters()})
    return grads, out.b_global, float(out.loss_global)


class OpenClipStyle(nn.Module):
    """A loss as open_clip's training writes it: the projections and the temperature of
    ``make_loss``'s module, unit features, and ``palmtree.compat.open_clip.ClipLoss``, which
    returns a tensor (this rank's ``N * share_r``)."""

    def __init__(self, backend):
        super().__init__()
        self.inner = make_loss("clip", backend)
        self.clip = ClipLossCompat(local_loss=True, gather_with_grad=True, backend=backend)

    def forward(self, img, txt, mask):
        u = nn.functional.normalize(self.inner.image_proj(img), dim=-1, eps=1e-6)
        pooled = palmtree.masked_mean_pool(self.inner.text_proj(txt), mask)
        v = nn.functional.normalize(pooled, dim=-1, eps=1e-6)
        return self.clip(u, v, self.inner.logit_scale.exp().reshape(()))


def tensor_loss_on_rank(rank, n, returns, backend):
    """``loss_fn`` returns a scalar tensor: a function around a palmtree loss module (its
    parameters found through the graph) or an open_clip-style module."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    towers = Towers(0.2)
    if returns == "open_clip":
        loss_fn = OpenClipStyle(backend)
        named = loss_fn.inner.named_parameters()
    else:
        loss = make_loss("clip", backend)
        loss_fn, named = (lambda *f: loss(*f).loss), loss.named_parameters()
    torch.manual_seed(SEEDS[rank])
    out = palmtree.accumulate(DDP(towers), loss_fn, pieces_of(n)[rank])
    assert isinstance(out, torch.Tensor) and not out.requires_grad
    grads = {f"towers.{k}": p.grad for k, p in towers.named_parameters()}
    grads.update({f"loss.{k}": p.grad for k, p in named})
    return grads


def bad_encoder_on_rank(rank, n, bad_rank, what):
    towers = Towers()

    def encode(pixels, tokens, mask):
        img, txt, mask = towers(pixels, tokens, mask)
        if rank == bad_rank and what == "width":
            return img[:, :6], txt, mask
        if rank == bad_rank and what == "raises":
            raise RuntimeError("out of tokens")
        return img, txt, mask

    encode_module = _Wrapped(encode, towers)
    palmtree.accumulate(encode_module, make_loss("clip", "chunked"), pieces_of(n)[rank])
    return "no error"


class _Wrapped(nn.Module):
    """A module around a function, so that accumulate can average its parameters."""

    def __init__(self, fn, inner):
        super().__init__()
        self.fn, self.inner = fn, inner

    def forward(self, *args):
        return self.fn(*args)


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda n: f"N{n}")
def world(request):
    w = World(request.param)
    yield w
    w.close()


@pytest.mark.parametrize(
    "kind,backend", [("clip", "chunked"), ("clip", "reference"), ("siglip", "chunked")]
)
def test_gradients_equal_one_process_on_the_global_batch(world, kind, backend):
    n = world.size
    results = world.run(accumulate_on_rank, kind, backend, 0.2)
    exact, plain, bounds = gradients(kind, backend, pieces_of(n), SEEDS, dropout=0.2)
    total = sum(sum(m) for m in MICRO[n])
    for rank, (grads, b_global, _) in enumerate(results):
        assert b_global == total
        check_gradients(grads, exact, plain, bounds, f" on rank {rank}")


def test_plain_towers_are_averaged_by_accumulate(world):
    """Towers without DDP: accumulate averages their gradients over the ranks itself."""
    n = world.size
    results = world.run(accumulate_on_rank, "clip", "chunked", 0.2, wrap=False)
    exact, plain, bounds = gradients("clip", "chunked", pieces_of(n), SEEDS, dropout=0.2)
    for rank, (grads, _, _) in enumerate(results):
        check_gradients(grads, exact, plain, bounds, f" on rank {rank}")


@pytest.mark.parametrize("returns", ["function", "open_clip"])
def test_a_loss_fn_returning_a_tensor_gives_the_same_gradients(world, returns):
    """Each rank's value is backpropagated and the gradients averaged over ranks: for
    palmtree's values (``N * share_r``, whose mean is the global loss) the exact gradient."""
    n = world.size
    results = world.run(tensor_loss_on_rank, returns, "chunked")
    exact, plain, bounds = gradients("clip", "chunked", pieces_of(n), SEEDS, dropout=0.2)
    for rank, grads in enumerate(results):
        check_gradients(grads, exact, plain, bounds, f" on rank {rank}")


@pytest.mark.parametrize(
    "what,words", [("width", "feature"), ("raises", "encode failed on micro-batch 0")]
)
def test_a_bad_encoder_raises_on_every_rank(world, what, words):
    n = world.size
    bad = n - 1 if MICRO[n][n - 1] else 0
    for r in world.run(bad_encoder_on_rank, bad, what, expect_raise=True):
        assert r.type == "ClipLossInputError", r
        assert words in r.message
        if n > 1:
            assert f"rank {bad}" in r.message


def test_token_latents_of_different_lengths_are_padded():
    """One process, no dropout: micro-batches with 5 and 3 token positions give the
    gradients of one loss on the whole batch padded to 5."""
    pixels, tokens, mask = tower_batch(9)
    short = (pixels[6:], tokens[6:, :3], mask[6:, :3].clone())
    short[2][:, 0] = 1  # every caption keeps a real token
    micro = [(pixels[:6], tokens[:6], mask[:6]), short]
    towers, loss_fn = Towers(), make_loss("clip", "chunked")
    palmtree.accumulate(towers, loss_fn, micro)
    got = [p.grad.clone() for p in list(towers.parameters()) + list(loss_fn.parameters())]

    towers2, loss2 = Towers(), make_loss("clip", "chunked")
    img = torch.cat([towers2(*m)[0] for m in micro])
    txt_a, txt_b = (towers2(*m)[1] for m in micro)
    txt = torch.cat([txt_a, nn.functional.pad(txt_b, (0, 0, 0, 2))])
    full_mask = torch.cat([micro[0][2], nn.functional.pad(micro[1][2], (0, 2))])
    loss2(img, txt, full_mask).loss.backward()
    want = [p.grad for p in list(towers2.parameters()) + list(loss2.parameters())]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_batch_norm_in_training_mode_warns():
    class WithNorm(Towers):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(10)

        def forward(self, pixels, tokens, mask):
            img, txt, mask = super().forward(pixels, tokens, mask)
            return self.norm(img), txt, mask

    micro = split(tower_batch(8), [4, 4])
    with pytest.warns(UserWarning, match="BatchNorm"):
        palmtree.accumulate(WithNorm(), make_loss("clip", "chunked"), micro)
