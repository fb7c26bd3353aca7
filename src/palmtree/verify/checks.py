"""What every rank computes: its slice of the seeded batch through the loss and back,
against ``palmtree.testing``'s float64 truth, reduced over ranks into rows.

Every rank regenerates the same global batch (:func:`palmtree.testing.make_pairs`) and
the same truth on its own device; only the rows' figures travel between ranks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import clip_loss, siglip_loss, testing
from .options import Options, default_backends
from .rules import Comparison, Row, figures_by_quantity, judge, quantities
from .targets import Extras
from .truth import Case, Truth

#: SigLIP's rows: its usual initial bias, and the opposite sign (most logits positive).
SIGLIP_BIASES = (-10.0, 10.0)
#: The texts' noise in ``make_pairs``: enough (positive cosine about 0.45) that the CLIP
#: loss stays of order one at both default temperatures, as in training.
NOISE = 2.0


def split_sizes(B: int, n: int) -> list[int]:
    """An uneven split of ``B`` pairs over ``n`` ranks; rank 1 is empty when ``n >= 3``.

    Rank ``r`` gets a share proportional to ``r + 2``, so every size differs.
    """
    weights = [0 if (n >= 3 and r == 1) else r + 2 for r in range(n)]
    total = sum(weights)
    sizes = [B * w // total for w in weights]
    r = n - 1
    while sum(sizes) < B:  # the remainder goes to the largest ranks
        if weights[r]:
            sizes[r] += 1
        r = (r - 1) % n
    return sizes


def cases(opts: Options) -> list[Case]:
    """CLIP at every scale; SigLIP at the largest, with each of :data:`SIGLIP_BIASES`; then
    each of ``opts.targets`` for each loss at the largest scale (SigLIP: the first bias)."""
    out, top = [], max(opts.scales)
    if "clip" in opts.losses:
        out += [Case("clip", s) for s in opts.scales]
    if "siglip" in opts.losses:
        out += [Case("siglip", top, b) for b in SIGLIP_BIASES]
    for loss, bias in (("clip", None), ("siglip", SIGLIP_BIASES[0])):
        if loss in opts.losses:
            out += [Case(loss, top, bias, t) for t in opts.targets]
    return out


def run_checks(rank: int, n: int, device, opts: Options, progress=lambda step: None) -> list[Row]:
    """Every rank of the world calls this; each returns the same rows (figures reduced)."""
    backends = opts.backends or default_backends(device)
    sizes = split_sizes(opts.batch, n)
    img, txt = (
        x.to(device) for x in testing.make_pairs(opts.batch, opts.dim, opts.seed, noise=NOISE)
    )
    extras = Extras.make(opts, n, txt, NOISE)
    fault = opts.fault[0] if opts.fault and opts.fault[1] == rank else None
    rows = []
    old_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # only the precision argument rounds
    try:
        for case in cases(opts):
            for precision in opts.precisions:
                progress(f"float64 truth and plain fp32, {precision}, {case.describe()}")
                truth = Truth.compute(case, precision, img, txt, sizes, extras)
                for backend in backends:
                    progress(case.step(backend, precision))
                    if fault == "raise":
                        raise RuntimeError(
                            f"injected fault on rank {rank} at {case.step(backend, precision)}"
                        )
                    if fault == "hang":
                        time.sleep(1e6)
                    args = (case, backend, precision, img, txt, sizes, rank, opts)
                    ours = Results.compute(*args, extras.for_rank(case.targets, rank, sizes, fault))
                    ours.inject(fault)
                    row = Row(backend, precision, case.scale, case.loss, case.bias, case.targets)
                    rows.append(judge(row, _figures(case, truth, ours, sizes, rank)))
    finally:
        torch.set_float32_matmul_precision(old_precision)
    return rows


#: Each gradient tensor's quantity in the rows, by its name in the truth.
TENSORS = {"d_img": "d_image", "d_txt": "d_text", "d_neg": "d_neg"}


@dataclass
class Results:
    """What this rank's slice gives: the returned loss, the global metrics, its gradient
    tensors (``d_img``, ``d_txt``, and ``d_neg`` with negatives, each with its rows of the
    global truth in ``spans``) and its gradients of the temperature (and bias)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]  # loss_global, and SigLIP's loss_pos and loss_neg
    grads: dict[str, torch.Tensor]
    spans: dict[str, slice]
    d_scale: torch.Tensor
    d_bias: torch.Tensor | None

    @classmethod
    def compute(cls, case, backend, precision, img, txt, sizes, rank, opts, extra) -> Results:
        """``extra``: this rank's labels and negatives (:meth:`~.targets.Extras.for_rank`)."""
        offset, b, dev = sum(sizes[:rank]), sizes[rank], img.device
        i = img[offset : offset + b].clone().requires_grad_()
        t = txt[offset : offset + b].clone().requires_grad_()
        theta = torch.tensor(case.log_scale, device=dev, requires_grad=True)
        kw = dict(backend=backend, precision=precision, chunk_size=opts.chunk_size, **extra.kwargs)
        leaves = {"d_img": i, "d_txt": t}
        spans = {"d_img": slice(offset, offset + b), "d_txt": slice(offset, offset + b)}
        if extra.negatives is not None:
            leaves["d_neg"], spans["d_neg"] = extra.negatives, extra.span
        if case.loss == "clip":
            bias = None
            out = clip_loss(i, t, theta, **kw)
            parts = {"loss_global": out.loss_global}
        else:
            bias = torch.tensor(case.bias, device=dev, requires_grad=True)
            out = siglip_loss(i, t, theta, bias, **kw)
            parts = {"loss_global": out.loss_global, "loss_pos": out.loss_pos}
            parts["loss_neg"] = out.loss_neg
        out.loss.backward()
        grads = {k: _grad(x) for k, x in leaves.items()}
        d_bias = None if bias is None else _grad(bias)
        return cls(out.loss.detach(), parts, grads, spans, _grad(theta), d_bias)

    def inject(self, fault: str | None) -> None:
        """``--inject-fault``: a wrong feature gradient, a NaN temperature gradient, or a
        wrong gradient of the negatives."""
        if fault == "wrong":
            self.grads["d_img"] = self.grads["d_img"] * 1.25
        elif fault == "nan":
            self.d_scale = torch.full_like(self.d_scale, math.nan)
        elif fault == "d_neg" and "d_neg" in self.grads:
            self.grads["d_neg"] = self.grads["d_neg"] * 1.25


def _figures(case: Case, truth: Truth, ours: Results, sizes: list[int], rank: int) -> list[float]:
    """The row's figures (:func:`~.rules.figures_by_quantity`), reduced over ranks.

    Sums are compared with the truth's bounds, each rank's gradient tensors with the
    tensors' bounds; the temperature's and bias's gradients are first averaged over
    ranks in float64, as DDP applies them.
    """
    ex, n = truth.exact, len(sizes)
    share, share_bound = n * ex.shares[rank], n * float(ex.share_bounds[rank])
    found = [Comparison("loss", testing.max_error(ours.loss, share), share_bound, _size(share))]
    bounds = {"loss_global": ex.loss_bound}
    if case.loss == "siglip":
        bounds.update(loss_pos=ex.pos_bound, loss_neg=ex.neg_bound)
    for name, value in ours.parts.items():
        want = ex.loss if name == "loss_global" else getattr(ex, name)
        found.append(Comparison("loss", testing.max_error(value, want), bounds[name], _size(want)))
    for k, value in ours.grads.items():
        want = getattr(ex, k)
        err = testing.max_error(value, n * want[ours.spans[k]])
        found.append(Comparison(TENSORS[k], err, truth.bounds[k], n * _size(want)))
    scalars = [("d_scale", ours.d_scale, ex.d_scale, ex.d_scale_bound)]
    if case.loss == "siglip":
        scalars.append(("d_bias", ours.d_bias, ex.d_bias, ex.d_bias_bound))
    means = _mean_over_ranks([value for _, value, _, _ in scalars], n)
    for (q, _, want, bound), mean in zip(scalars, means, strict=True):
        found.append(Comparison(q, testing.max_error(mean, want), bound, _size(want)))
    names = quantities(case.loss, case.targets)
    figures = torch.tensor(figures_by_quantity(found, names), dtype=torch.float64)
    if _distributed(n):
        # No NaN in it (figures are inf where not finite), so MAX keeps every failure.
        figures = figures.to(ours.loss.device)
        dist.all_reduce(figures, op=dist.ReduceOp.MAX)
    return figures.tolist()


def _mean_over_ranks(values: list[torch.Tensor], n: int) -> torch.Tensor:
    """The mean over ranks of each rank's scalars, in float64 (a NaN stays NaN)."""
    total = torch.stack([v.detach().double().reshape(()) for v in values])
    if _distributed(n):
        dist.all_reduce(total)
    return (total / n).cpu()


def _grad(x: torch.Tensor) -> torch.Tensor:
    """``x.grad``; NaN where no gradient reached ``x`` (a failure, unless ``x`` is empty)."""
    return x.grad if x.grad is not None else torch.full_like(x, math.nan)


def _size(x: torch.Tensor) -> float:
    return float(x.detach().double().abs().max()) if x.numel() else 0.0


def _distributed(n: int) -> bool:
    return n > 1 and dist.is_available() and dist.is_initialized()
