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
from .rules import QUANTITIES, Comparison, Row, figures_by_quantity, judge

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


@dataclass(frozen=True)
class Case:
    """One loss at one temperature (and, for SigLIP, one bias)."""

    loss: str
    scale: float
    bias: float | None = None

    @property
    def log_scale(self) -> float:
        """The fp32 ``logit_scale`` the ranks hold: the truth is that of this input."""
        return float(torch.tensor(math.log(self.scale), dtype=torch.float32))

    def describe(self) -> str:
        bias = "" if self.bias is None else f", bias {self.bias:+g}"
        return f"{self.loss} at scale {self.scale:.4g}{bias}"

    def step(self, backend: str, precision: str) -> str:
        """What the progress reports say, e.g. ``siglip chunked/bf16/scale 99/bias -10``."""
        where = f"{backend}/{precision}/scale {self.scale:.4g}"
        return where if self.bias is None else f"{self.loss} {where}/bias {self.bias:+g}"


def cases(opts: Options) -> list[Case]:
    """CLIP at every scale; SigLIP at the largest, with each of :data:`SIGLIP_BIASES`."""
    out = []
    if "clip" in opts.losses:
        out += [Case("clip", s) for s in opts.scales]
    if "siglip" in opts.losses:
        out += [Case("siglip", max(opts.scales), b) for b in SIGLIP_BIASES]
    return out


def run_checks(rank: int, n: int, device, opts: Options, progress=lambda step: None) -> list[Row]:
    """Every rank of the world calls this; each returns the same rows (figures reduced)."""
    backends = opts.backends or default_backends(device)
    sizes = split_sizes(opts.batch, n)
    img, txt = (
        x.to(device) for x in testing.make_pairs(opts.batch, opts.dim, opts.seed, noise=NOISE)
    )
    fault = opts.fault[0] if opts.fault and opts.fault[1] == rank else None
    rows = []
    old_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # only the precision argument rounds
    try:
        for case in cases(opts):
            for precision in opts.precisions:
                progress(f"float64 truth and plain fp32, {precision}, {case.describe()}")
                truth = Truth.compute(case, precision, img, txt, sizes)
                for backend in backends:
                    progress(case.step(backend, precision))
                    if fault == "raise":
                        raise RuntimeError(
                            f"injected fault on rank {rank} at {case.step(backend, precision)}"
                        )
                    if fault == "hang":
                        time.sleep(1e6)
                    ours = Results.compute(case, backend, precision, img, txt, sizes, rank, opts)
                    ours.inject(fault)
                    row = Row(backend, precision, case.scale, case.loss, case.bias)
                    rows.append(judge(row, _figures(case, truth, ours, sizes, rank)))
    finally:
        torch.set_float32_matmul_precision(old_precision)
    return rows


@dataclass
class Truth:
    """The float64 truth of one case on the whole batch (``testing.ClipTruth`` or
    ``testing.SigLipTruth``, bounds for ``precision``), and the bounds of the two
    gradient tensors from a plain fp32 computation with the same operand rounding and
    the gradients' sizes before the normalisation's projection
    (:func:`palmtree.testing.tensor_bound`)."""

    exact: testing.ClipTruth | testing.SigLipTruth
    d_image_bound: float
    d_text_bound: float

    @classmethod
    def compute(cls, case: Case, precision: str, img, txt, sizes: list[int]) -> Truth:
        """Both on the batch's device. The plain computation materialises the ``B x B``
        logits (and autograd's few copies of them); it is the worst of a few summation
        orders (:func:`palmtree.testing.worst_of_orders`), what plain fp32 can be relied
        on to achieve on any machine."""
        n = len(sizes)
        block = max(1, (1 << 25) // len(img)) if img.is_cuda else None  # fewer launches
        kw = dict(sizes=sizes, precision=precision)
        if case.loss == "clip":
            exact = testing.clip_truth(img, txt, case.log_scale, block=block, **kw)

            def plain(i, t):
                return testing.plain_fp32(i, t, case.log_scale, **kw)
        else:
            exact = testing.siglip_truth(img, txt, case.log_scale, case.bias, block=block, **kw)

            def plain(i, t):
                return testing.plain_fp32_siglip(i, t, case.log_scale, case.bias, **kw)

        tensors = {"d_img": exact.d_img, "d_txt": exact.d_txt}
        try:
            worst = testing.worst_of_orders(plain, img, txt, tensors)
        except torch.OutOfMemoryError as exc:
            raise RuntimeError(
                f"the plain fp32 computation that bounds the gradient tensors holds the "
                f"{len(img)} x {len(img)} logits and does not fit on {img.device}; "
                "use a smaller --batch"
            ) from exc
        # Where the truth is 0 (D = 1: the normalisation's projection removes it all),
        # relative to the gradient before that projection: fp32 leaves its rounding.
        d_img, d_txt = (
            testing.tensor_bound(n * worst[k], n * v, size=n * getattr(exact, f"{k}_size"))
            for k, v in tensors.items()
        )
        return cls(exact, d_img, d_txt)


@dataclass
class Results:
    """What this rank's slice gives: the returned loss, the global metrics, its feature
    gradients and its gradients of the temperature (and bias)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]  # loss_global, and SigLIP's loss_pos and loss_neg
    d_image: torch.Tensor
    d_text: torch.Tensor
    d_scale: torch.Tensor
    d_bias: torch.Tensor | None

    @classmethod
    def compute(cls, case, backend, precision, img, txt, sizes, rank, opts) -> Results:
        offset, b, dev = sum(sizes[:rank]), sizes[rank], img.device
        i = img[offset : offset + b].clone().requires_grad_()
        t = txt[offset : offset + b].clone().requires_grad_()
        theta = torch.tensor(case.log_scale, device=dev, requires_grad=True)
        kw = dict(backend=backend, precision=precision, chunk_size=opts.chunk_size)
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
        grads = [_grad(x) for x in (i, t, theta)]
        return cls(out.loss.detach(), parts, *grads, None if bias is None else _grad(bias))

    def inject(self, fault: str | None) -> None:
        """``--inject-fault``: a wrong feature gradient, or a NaN temperature gradient."""
        if fault == "wrong":
            self.d_image = self.d_image * 1.25
        elif fault == "nan":
            self.d_scale = torch.full_like(self.d_scale, math.nan)


def _figures(case: Case, truth: Truth, ours: Results, sizes: list[int], rank: int) -> list[float]:
    """The row's figures (:func:`~.rules.figures_by_quantity`), reduced over ranks.

    Sums are compared with the truth's bounds, each rank's feature gradients with the
    tensors' bounds; the temperature's and bias's gradients are first averaged over
    ranks in float64, as DDP applies them.
    """
    ex, n = truth.exact, len(sizes)
    offset, b = sum(sizes[:rank]), sizes[rank]
    share, share_bound = n * ex.shares[rank], n * float(ex.share_bounds[rank])
    found = [Comparison("loss", testing.max_error(ours.loss, share), share_bound, _size(share))]
    bounds = {"loss_global": ex.loss_bound}
    if case.loss == "siglip":
        bounds.update(loss_pos=ex.pos_bound, loss_neg=ex.neg_bound)
    for name, value in ours.parts.items():
        want = ex.loss if name == "loss_global" else getattr(ex, name)
        found.append(Comparison("loss", testing.max_error(value, want), bounds[name], _size(want)))
    for q, value, want, bound in (
        ("d_image", ours.d_image, ex.d_img, truth.d_image_bound),
        ("d_text", ours.d_text, ex.d_txt, truth.d_text_bound),
    ):
        err = testing.max_error(value, n * want[offset : offset + b])
        found.append(Comparison(q, err, bound, n * _size(want)))
    scalars = [("d_scale", ours.d_scale, ex.d_scale, ex.d_scale_bound)]
    if case.loss == "siglip":
        scalars.append(("d_bias", ours.d_bias, ex.d_bias, ex.d_bias_bound))
    means = _mean_over_ranks([value for _, value, _, _ in scalars], n)
    for (q, _, want, bound), mean in zip(scalars, means, strict=True):
        found.append(Comparison(q, testing.max_error(mean, want), bound, _size(want)))
    figures = torch.tensor(figures_by_quantity(found, QUANTITIES[case.loss]), dtype=torch.float64)
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
