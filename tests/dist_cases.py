"""Functions each rank of a :class:`world.World` runs; they return plain tensors/dicts."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from towers import TwoTower, tower_batch

import palmtree
from palmtree.testing import make_pairs


def loss_and_grads(rank, n, backend, precision, sizes, weights, dim, seed, log_scale, **kw):
    """This rank's slice of the seeded global batch through the loss and its backward:
    ``clip_loss``, or ``siglip_loss`` when a ``bias`` is given."""
    img, txt = make_pairs(sum(sizes), dim, seed, kind=kw.pop("kind", "correlated"))
    o, b = sum(sizes[:rank]), sizes[rank]
    i = img[o : o + b].clone().requires_grad_()
    t = txt[o : o + b].clone().requires_grad_()
    params = {"d_scale": torch.tensor(log_scale, requires_grad=True)}
    kw.update(backend=backend, precision=precision)
    if "bias" in kw:
        params["d_bias"] = torch.tensor(kw.pop("bias"), requires_grad=True)
        out = palmtree.siglip_loss(i, t, *params.values(), **kw)
    else:
        out = palmtree.clip_loss(i, t, params["d_scale"], **kw)
    (out.loss * weights[rank]).backward()
    grads = {name: p.grad for name, p in params.items()}
    return dict(loss=out.loss.detach(), metrics=out.metrics(), d_img=i.grad, d_txt=t.grad, **grads)


def subgroup_loss(rank, n, backend, sizes, loss="clip"):
    """Ranks {0, 1} and {2, 3} each form a group: negatives come only from one's group."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = rank // 2
    first = 2 * mine
    img, txt = make_pairs(sum(sizes[first : first + 2]), 8, seed=11 + mine)
    o = sum(sizes[first:rank])
    i = img[o : o + sizes[rank]].clone().requires_grad_()
    t = txt[o : o + sizes[rank]].clone().requires_grad_()
    kw = dict(group=groups[mine], backend=backend)
    if loss == "clip":
        out = palmtree.clip_loss(i, t, torch.tensor(2.0), **kw)
    else:
        out = palmtree.siglip_loss(i, t, torch.tensor(2.0), torch.tensor(-3.0), **kw)
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


def _bad_call(kind, i, t, kw):
    """Turns one rank's good call into the bad call ``kind``: ``(i, t, kwargs)``."""
    kw = dict(kw)
    if kind in ("precision", "scale_cap", "chunk_size", "logit_scale_max", "backend"):
        kw[kind] = {
            "precision": "fp8",
            "scale_cap": "soft",
            "chunk_size": -1,
            "logit_scale_max": float("nan"),
            "backend": "magic",
        }[kind]
    elif kind == "other_backend":
        kw["backend"] = "reference"
    elif kind == "meta_features":
        i, t = i.to("meta"), t.to("meta")
    elif kind == "meta_scale":
        kw["logit_scale"] = torch.tensor(2.0, device="meta")
    elif kind == "other_scale":
        kw["logit_scale"] = torch.tensor(2.5)
    elif kind == "other_cap":
        kw["logit_scale_max"] = 50.0
    elif kind == "text_dtype":
        t = t.double()
    elif kind == "int_mask":
        t = t[:, None, :].expand(-1, 2, -1).clone()
        kw["text_mask"] = torch.tensor([[1, 2]] * len(t))
    return i, t, kw


def raises_on_bad_option(rank, n, bad_rank, kind):
    """Rank ``bad_rank`` passes a bad or mismatched option; the rest pass good ones."""
    img, txt = make_pairs(4 * n, 8, seed=3)
    i, t = img[4 * rank : 4 * rank + 4].clone(), txt[4 * rank : 4 * rank + 4].clone()
    kw = {"logit_scale": torch.tensor(2.0), "backend": "chunked"}
    if rank == bad_rank:
        i, t, kw = _bad_call(kind, i, t, kw)
    fused_off = rank == bad_rank and kind == "fused_cannot_run"
    if fused_off:  # as on a machine without CUDA or Triton
        kw["backend"] = "fused"
        os.environ["TRITON_INTERPRET"] = "0"
    try:
        if rank == bad_rank and kind == "other_loss":
            palmtree.siglip_loss(i, t, kw.pop("logit_scale"), 0.0, **kw)
        else:
            palmtree.clip_loss(i, t, kw.pop("logit_scale"), **kw)
    finally:
        if fused_off:
            os.environ["TRITON_INTERPRET"] = "1"
    return "no error"


def outside_the_group(rank, n):
    """Ranks 0 and 1 form a group; rank 2 wrongly calls the loss with it."""
    group = dist.new_group([0, 1])
    img, txt = make_pairs(8, 8, seed=4)
    if rank == 3:
        return "not called"
    out = palmtree.clip_loss(
        img[4 * rank : 4 * rank + 4],
        txt[4 * rank : 4 * rank + 4],
        torch.tensor(2.0),
        group=group,
        backend="chunked",
    )
    return out.b_global


def padded_tokens_do_not_matter(rank, n):
    """Padded positions holding NaN and inf give the loss of padded positions holding 0."""
    img, txt = make_pairs(3 * n, 8, seed=5)
    i, t = img[3 * rank : 3 * rank + 3], txt[3 * rank : 3 * rank + 3]
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    clean = (t[:, None, :] * torch.arange(1.0, 5.0)[None, :, None]) * mask[:, :, None]
    dirty = clean.clone()
    dirty[mask == 0] = float("nan")
    dirty[1, 3] = float("inf")
    return [
        float(palmtree.clip_loss(i, x, torch.tensor(2.0), text_mask=mask, backend="chunked").loss)
        for x in (dirty, clean)
    ]


def empty_world(rank, n, backend):
    palmtree.clip_loss(torch.empty(0, 8), torch.empty(0, 8), torch.tensor(2.0), backend=backend)


def ddp_gradients(rank, n, backend, sizes, loss="clip"):
    """A DDP-wrapped two-tower model; returns its averaged parameter gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(TwoTower(backend, loss))
    pixels, tokens, mask = tower_batch(sum(sizes))
    o, b = sum(sizes[:rank]), sizes[rank]
    out = model(pixels[o : o + b], tokens[o : o + b], mask[o : o + b])
    out.loss.backward()
    return {name: p.grad.clone() for name, p in model.module.named_parameters()}


def barrier(rank, n):
    dist.barrier()
    return rank


def targets_loss_and_grads(rank, n, loss, backend, sizes, neg_sizes, labels, mode, weights):
    """This rank's slice of a seeded global batch with ``labels`` (``[B]`` or ``None``) and
    ``neg_sizes[r]`` extra negatives per rank (``None``: no negatives at all)."""
    img, txt = make_pairs(sum(sizes), 16, seed=5)
    negs = make_pairs(sum(neg_sizes or [0]) + 1, 16, seed=6)[1][1:]
    o, b = sum(sizes[:rank]), sizes[rank]
    i = img[o : o + b].clone().requires_grad_()
    t = txt[o : o + b].clone().requires_grad_()
    kw = dict(backend=backend, same_label=mode, chunk_size=4)
    neg = None
    if neg_sizes is not None:
        no = sum(neg_sizes[:rank])
        neg = negs[no : no + neg_sizes[rank]].clone().requires_grad_()
        kw["text_negatives"] = neg
    if labels is not None:
        kw["labels"] = labels[o : o + b]
    scale = torch.tensor(2.5, requires_grad=True)
    if loss == "clip":
        out, params = palmtree.clip_loss(i, t, scale, **kw), {"d_scale": scale}
    else:
        bias = torch.tensor(-2.0, requires_grad=True)
        out = palmtree.siglip_loss(i, t, scale, bias, **kw)
        params = {"d_scale": scale, "d_bias": bias}
    (out.loss * weights[rank]).backward()
    grads = {name: p.grad for name, p in params.items()}
    d_neg = None if neg is None else neg.grad
    if neg is not None and d_neg is None:  # no rank has a negative: nothing reached them
        assert sum(neg_sizes) == 0
        d_neg = torch.zeros_like(neg)
    return dict(
        loss=out.loss.detach(),
        metrics=out.metrics(),
        d_img=i.grad,
        d_txt=t.grad,
        d_neg=d_neg,
        **grads,
    )


def targets_bad_input(rank, n, bad_rank, kind):
    """Rank ``bad_rank`` passes bad labels or negatives of the given kind."""
    img, txt = make_pairs(3 * n, 8, seed=3)
    i, t = img[3 * rank : 3 * rank + 3], txt[3 * rank : 3 * rank + 3]
    labels, negs, mode = torch.tensor([0, 1, 0]), torch.randn(2, 8), "positive"
    if rank == bad_rank:
        if kind == "float":
            labels = labels.float()
        elif kind == "length":
            labels = labels[:2]
        elif kind == "width":
            negs = torch.randn(2, 7)
        elif kind == "one_rank":
            labels = None
        elif kind == "negatives_one_rank":
            negs = None
        elif kind == "mode":
            mode = "positives"
        elif kind == "nan":
            negs[1, 3] = float("nan")
    kw = dict(labels=labels, text_negatives=negs, same_label=mode, backend="chunked")
    palmtree.clip_loss(i, t, torch.tensor(2.0), **kw)
