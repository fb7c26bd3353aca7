"""Functions each rank of a :class:`world.World` runs; they return plain tensors/dicts."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import palmtree
from palmtree.testing import make_pairs


def loss_and_grads(rank, n, backend, precision, sizes, weights, dim, seed, log_scale, **kw):
    """This rank's slice of the seeded global batch through ``clip_loss`` and backward."""
    img, txt = make_pairs(sum(sizes), dim, seed, kind=kw.pop("kind", "correlated"))
    o, b = sum(sizes[:rank]), sizes[rank]
    i = img[o : o + b].clone().requires_grad_()
    t = txt[o : o + b].clone().requires_grad_()
    ls = torch.tensor(log_scale, requires_grad=True)
    out = palmtree.clip_loss(i, t, ls, backend=backend, precision=precision, **kw)
    (out.loss * weights[rank]).backward()
    return {
        "loss": out.loss.detach(),
        "metrics": out.metrics(),
        "d_img": i.grad,
        "d_txt": t.grad,
        "d_scale": ls.grad,
    }


def subgroup_loss(rank, n, backend, sizes):
    """Ranks {0, 1} and {2, 3} each form a group: negatives come only from one's group."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = rank // 2
    first = 2 * mine
    img, txt = make_pairs(sum(sizes[first : first + 2]), 8, seed=11 + mine)
    o = sum(sizes[first:rank])
    i = img[o : o + sizes[rank]].clone().requires_grad_()
    t = txt[o : o + sizes[rank]].clone().requires_grad_()
    out = palmtree.clip_loss(i, t, torch.tensor(2.0), group=groups[mine], backend=backend)
    out.loss.backward()
    return {"metrics": out.metrics(), "d_img": i.grad, "d_txt": t.grad}


def raises_on_bad_input(rank, n, bad_rank, kind, backend):
    """Rank ``bad_rank`` passes a bad input of the given kind; the rest pass good ones."""
    img, txt = make_pairs(4 * n, 8, seed=3)
    i, t = img[4 * rank : 4 * rank + 4].clone(), txt[4 * rank : 4 * rank + 4].clone()
    mask = None
    if rank == bad_rank:
        if kind == "nan":
            t[1, 2] = float("nan")
        elif kind == "dim":
            i, t = torch.randn(4, 6), torch.randn(4, 6)
        elif kind == "dtype":
            i, t = i.double(), t.double()
        elif kind == "local_dim":
            t = torch.randn(4, 5)
        elif kind == "empty_mask":
            t = t[:, None, :].expand(4, 3, 8).clone()
            mask = torch.ones(4, 3)
            mask[2] = 0
    if mask is None and kind == "empty_mask":
        t = t[:, None, :].expand(4, 3, 8).clone()
        mask = torch.ones(4, 3)
    palmtree.clip_loss(i, t, torch.tensor(2.0), text_mask=mask, backend=backend)
    return "no error"


def empty_world(rank, n, backend):
    palmtree.clip_loss(torch.empty(0, 8), torch.empty(0, 8), torch.tensor(2.0), backend=backend)


class TwoTower(nn.Module):
    """Tiny image and text towers of different widths, joined by ClipLoss' projections."""

    def __init__(self, backend):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 10))
        self.text = nn.Sequential(nn.Embedding(20, 6), nn.Linear(6, 7))
        self.loss = palmtree.ClipLoss(image_dim=10, text_dim=7, embed_dim=8, backend=backend)

    def forward(self, pixels, tokens, mask):
        return self.loss(self.image(pixels), self.text(tokens), text_mask=mask)


def tower_batch(big, seed=5):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(big, 12, generator=g)
    tokens = torch.randint(0, 20, (big, 5), generator=g)
    lengths = torch.randint(1, 6, (big,), generator=g)
    mask = (torch.arange(5)[None, :] < lengths[:, None]).long()
    return pixels, tokens, mask


def ddp_gradients(rank, n, backend, sizes):
    """A DDP-wrapped two-tower model; returns its averaged parameter gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(TwoTower(backend))
    pixels, tokens, mask = tower_batch(sum(sizes))
    o, b = sum(sizes[:rank]), sizes[rank]
    out = model(pixels[o : o + b], tokens[o : o + b], mask[o : o + b])
    out.loss.backward()
    return {name: p.grad.clone() for name, p in model.module.named_parameters()}


def barrier(rank, n):
    dist.barrier()
    return rank
