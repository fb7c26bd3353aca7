"""The losses inside ``torch.compile(fullgraph=True)``, eager beside them; shared by the
single-process tests and the gloo ranks of tests/test_compile.py (a :class:`world.World`
runs the module-level functions here)."""

from __future__ import annotations

import math

import torch

import palmtree
from palmtree.testing import make_pairs

LOG_10 = math.log(10.0)
BIAS = -2.0
DIM = 16


def loss_fn(kind: str, backend: str, **options):
    """``f(img, txt, log_scale, bias, labels=None) -> (loss, loss_global)`` through the
    functional loss (``options`` may name ``same_label`` for the calls with labels)."""

    def f(img, txt, scale, bias, labels=None):
        kw = options if labels is None else {**options, "labels": labels}
        if kind == "clip":
            out = palmtree.clip_loss(img, txt, scale, backend=backend, **kw)
        else:
            out = palmtree.siglip_loss(img, txt, scale, bias, backend=backend, **kw)
        return out.loss, out.loss_global

    return f


def leaves(img, txt):
    """Fresh leaves: the features, a ``[1]``-shaped log-scale (as FSDP2 and HF keep it)
    and a 0-dim bias."""
    scale = torch.tensor([LOG_10], requires_grad=True)
    bias = torch.tensor(BIAS, requires_grad=True)
    return img.clone().requires_grad_(), txt.clone().requires_grad_(), scale, bias


def run_step(fn, img, txt, labels=None) -> dict:
    """One forward and backward of ``fn``: the loss, ``loss_global`` and the gradients."""
    i, t, s, b = leaves(img, txt)
    loss, loss_global = fn(i, t, s, b, *([] if labels is None else [labels]))
    loss.backward()
    grads = {"d_img": i.grad, "d_txt": t.grad, "d_scale": s.grad.reshape(())}
    grads["d_bias"] = torch.zeros(()) if b.grad is None else b.grad
    return {"loss": loss.detach(), "loss_global": loss_global.detach(), **grads}


def compiled(fn, compiler: str):
    return torch.compile(fn, fullgraph=True, backend=compiler)


def slice_of(rank: int, sizes: list[int], *tensors):
    o = sum(sizes[:rank])
    return [x[o : o + sizes[rank]] for x in tensors]


def step_labels(B: int) -> torch.Tensor:
    """The labels of a global batch of ``B`` pairs in the runs with labels: three items,
    each spread over every rank."""
    return torch.arange(B) % 3


def ranks_compiled_and_eager(
    rank, n, kind, backend, splits, compiler="aot_eager", same_label=None
) -> dict:
    """On every rank: each split of a seeded global batch through the compiled loss and
    through eager, one after the other (the compiled function is compiled once, then
    reused), with :func:`step_labels` under ``same_label`` if it is given; also how many
    graphs Dynamo compiled, and the graph breaks ``torch._dynamo.explain`` finds in the
    first."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    fn = loss_fn(kind, backend, **({} if same_label is None else {"same_label": same_label}))
    cfn = compiled(fn, compiler)
    steps = []
    for k, sizes in enumerate(splits):
        img, txt = make_pairs(sum(sizes), DIM, seed=40 + k)
        mine = slice_of(rank, sizes, img, txt, step_labels(sum(sizes)))
        if same_label is None:
            mine = mine[:2]
        steps.append({"compiled": run_step(cfn, *mine), "eager": run_step(fn, *mine)})
    graphs = int(counters["stats"]["unique_graphs"])
    img, txt = make_pairs(sum(splits[0]), DIM, seed=40)
    # explain traces as torch.compile without fullgraph=True does; fullgraph=True turns
    # capture_scalar_outputs on itself, for the ranks' sizes the exchange reads.
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        explained = torch._dynamo.explain(fn)(*leaves(*slice_of(rank, splits[0], img, txt)))
    return {"steps": steps, "graphs": graphs, "breaks": explained.graph_break_count}


def compiled_error(rank, n, bad_rank, what) -> tuple[str, str]:
    """``(type, message)`` of what one compiled call raises on this rank when rank
    ``bad_rank``'s inputs hold a bad value (``what``); every rank calls the loss."""
    torch._dynamo.reset()
    img, txt = make_pairs(4, DIM, seed=3)
    mask = torch.ones(4, 3, dtype=torch.bool)
    scale = torch.tensor(LOG_10)
    if rank == bad_rank:
        if what == "nan":
            img = img.clone()
            img[1, 2] = math.nan
        elif what == "mask":
            mask[2] = False
        elif what == "scale":
            scale = torch.tensor(LOG_10 + 1.0)
        elif what == "empty":
            img, txt, mask = img[:0], txt[:0], mask[:0]
    tokens = txt[:, None, :].expand(len(txt), 3, DIM)

    def f(i, t, m, s):
        return palmtree.clip_loss(i, t, s, text_mask=m).loss

    try:
        compiled(f, "aot_eager")(img, tokens, mask, scale)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "", ""
