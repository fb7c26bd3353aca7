"""``palmtree.accumulate`` in one process: what it leaves behind when it returns or raises.

After a failure every ``.grad``, buffer and the RNG are as before the call; after success
the buffers and the RNG are those of one plain forward of the micro-batches in order; a
second pass that does not reproduce the first is an error (or, within rounding, quiet).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
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

import palmtree
from palmtree.accumulate import replay


def micro(sizes=(4, 5, 3)):
    return split(tower_batch(sum(sizes)), sizes)


def some_gradients(*modules):
    """A gradient in some parameters, ``None`` in the others, as a loop mid-step has them."""
    for m in modules:
        for i, p in enumerate(m.parameters()):
            p.grad = torch.full_like(p, 0.5) if i % 2 else None


@pytest.mark.parametrize(
    "what,when,words",
    [
        ("raise", 2, "micro-batch 1 (second pass): RuntimeError: simulated failure"),
        ("width", 2, "micro-batch 1 encoded again (second pass) gave image features"),
        ("nan", 2, "micro-batch 1 encoded again (second pass) gave image features with NaN"),
        ("raise", 1, "encode failed on micro-batch 1: RuntimeError: simulated failure"),
        ("backward", 2, "the backward failed for micro-batch 1 (second pass): RuntimeError"),
    ],
)
def test_a_failure_leaves_gradients_buffers_and_rng_as_they_were(what, when, words):
    towers, loss_fn = WithNorm(dropout=0.2), make_loss("clip", "chunked")
    some_gradients(towers, loss_fn)
    torch.manual_seed(4)
    before = state_of(towers, loss_fn)
    with pytest.warns(UserWarning, match="BatchNorm"):
        with pytest.raises(palmtree.ClipLossInputError, match="micro-batch 1") as info:
            palmtree.accumulate(Faulty(towers, what, at=1, when=when), loss_fn, micro())
    assert words in str(info.value)
    assert state_differences(before, state_of(towers, loss_fn)) == []


def test_a_failing_loss_fn_is_one_clear_error_and_changes_nothing():
    towers, loss = Towers(dropout=0.2), make_loss("clip", "chunked")
    some_gradients(towers, loss)

    def loss_fn(img, txt, mask):
        loss(img, txt, mask)
        raise KeyError("no such column")

    before = state_of(towers, loss)
    with pytest.raises(palmtree.ClipLossInputError, match="loss_fn failed: KeyError"):
        palmtree.accumulate(towers, loss_fn, micro())
    assert state_differences(before, state_of(towers, loss)) == []


def test_buffers_and_rng_are_those_of_one_plain_forward():
    """BatchNorm in training mode: its running statistics and count are updated once per
    micro-batch, as by a plain forward; the RNG is where that forward and the loss leave it."""
    pieces = micro()
    plain = WithNorm(dropout=0.2)
    torch.manual_seed(4)
    for p in pieces:
        plain(*p)
    want_rng = torch.get_rng_state()

    towers, loss_fn = WithNorm(dropout=0.2), make_loss("clip", "chunked")  # both seed
    torch.manual_seed(4)
    with pytest.warns(UserWarning, match="BatchNorm"):
        palmtree.accumulate(towers, loss_fn, pieces)
    assert int(towers.norm.num_batches_tracked) == len(pieces)
    for (name, got), want in zip(towers.named_buffers(), plain.buffers(), strict=True):
        assert torch.equal(got, want), name
    assert torch.equal(torch.get_rng_state(), want_rng)


@pytest.mark.parametrize("what", ["rng", "scale"])
def test_a_second_pass_that_computes_another_function_is_an_error(what):
    """Dropout from a generator accumulate cannot replay; features 1.001 times larger."""
    encode = Faulty(Towers(), what, at=2, eps=1e-3)
    with pytest.raises(palmtree.ClipLossInputError, match="rho = ") as info:
        palmtree.accumulate(encode, make_loss("clip", "chunked"), micro())
    at = 0 if what == "rng" else 2
    assert f"micro-batch {at} encoded again (second pass) gave image features" in str(info.value)


@pytest.mark.parametrize("eps,warns", [(2.0**-23, False), (1e-5, True)])
def test_a_second_pass_off_by_rounding_is_quiet_beyond_it_warns(monkeypatch, eps, warns):
    """One ulp (2**-23) is within ``(D/2 + 1) * 2**-24`` (D = 10: 6 units): quiet. 1e-5 is
    above it and below ``sqrt(2**-24)``: a warning, and the gradients are still given."""
    monkeypatch.setattr(replay, "WARNED", set())
    towers = Towers()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        palmtree.accumulate(
            Faulty(towers, "scale", at=1, eps=eps), make_loss("clip", "chunked"), micro()
        )
    got = [str(w.message) for w in seen if "second pass" in str(w.message)]
    assert len(got) == int(warns), got
    if warns:
        assert "micro-batch 1 encoded again (second pass) on rank 0" in got[0]
    assert all(p.grad is not None for p in towers.parameters())


class FastPathText(nn.Module):
    """A text tower of ``nn.TransformerEncoder`` in eval mode: without a graph it takes
    PyTorch's fused fast path (padding dropped as nested tensors), with one the plain path,
    so the two passes round differently, a few units of fp32 apart."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(12, 64)
        self.embed = nn.Embedding(20, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.text = nn.TransformerEncoder(layer, 2)
        self.eval()

    def forward(self, pixels, tokens, mask):
        latents = self.text(self.embed(tokens), src_key_padding_mask=mask == 0)
        return self.image(pixels), latents, mask


# The fast path packs padded tokens into a nested tensor, which torch says is a prototype.
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_a_fast_path_forward_is_within_rounding(monkeypatch):
    monkeypatch.setattr(replay, "WARNED", set())
    towers = FastPathText()
    pixels, tokens, mask = tower_batch(6)
    with torch.no_grad():
        fast = towers(pixels, tokens, mask)[1]
    slow = towers(pixels, tokens, mask)[1].detach()
    real = mask.bool()
    assert not torch.equal(fast[real], slow[real])  # the passes do differ
    loss_fn = palmtree.ClipLoss(image_dim=64, text_dim=64, embed_dim=8, backend="chunked")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        palmtree.accumulate(towers, loss_fn, [(pixels, tokens, mask)])


def test_a_tensor_outside_the_module_still_gets_its_gradient():
    """On one rank, what ``backward()`` would reach beyond ``encode``'s own parameters (a
    tensor it closes over) gets its gradient too: the second pass asks autograd for the
    module's parameters and every other leaf the graph reaches. One micro-batch, so that
    both sides sum the same terms in the same order: the same bits."""
    gain = torch.linspace(0.5, 1.5, 10).requires_grad_()

    class Closed(Towers):
        def forward(self, pixels, tokens, mask):
            img, txt, mask = super().forward(pixels, tokens, mask)
            return img * gain, txt, mask

    towers, loss_fn = Closed(), make_loss("clip", "chunked")
    (batch,) = micro((12,))
    palmtree.accumulate(towers, loss_fn, [batch])
    got, gain.grad = gain.grad, None
    loss_fn(*towers(*batch)).loss.backward()
    assert torch.equal(got, gain.grad)


def test_under_no_grad_a_clear_error():
    with torch.no_grad(), pytest.raises(palmtree.ClipLossInputError, match="autograd enabled"):
        palmtree.accumulate(Towers(), make_loss("clip", "chunked"), micro())


@pytest.mark.parametrize(
    "returns,words",
    [
        (lambda out: {"contrastive_loss": out.loss}, "got dict"),
        (lambda out: out.loss.expand(3), "of shape (3,)"),
        (lambda out: out.loss.detach(), "does not require grad"),
    ],
    ids=["dict", "vector", "detached"],
)
def test_a_loss_fn_returning_something_else_is_named(returns, words):
    loss = make_loss("clip", "chunked")
    with pytest.raises(palmtree.ClipLossInputError, match="loss_fn") as info:
        palmtree.accumulate(Towers(), lambda *f: returns(loss(*f)), micro())
    assert words in str(info.value)
    assert "scalar tensor" in str(info.value) or "require grad" in str(info.value)
