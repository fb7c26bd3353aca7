"""The float64 truth of one row and the bounds of its gradient tensors.

The truth is :mod:`palmtree.testing`'s, of one process on the whole batch; the tensors'
bounds come from a plain fp32 computation with the same operand rounding, the worst of
a few summation orders (docs/design.md §8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import testing
from .targets import Extras


@dataclass(frozen=True)
class Case:
    """One loss at one temperature (and, for SigLIP, one bias), and its global targets
    (``None``: none; one of :data:`~.options.TARGETS`: :mod:`.targets`)."""

    loss: str
    scale: float
    bias: float | None = None
    targets: str | None = None

    @property
    def log_scale(self) -> float:
        """The fp32 ``logit_scale`` the ranks hold: the truth is that of this input."""
        return float(torch.tensor(math.log(self.scale), dtype=torch.float32))

    def describe(self) -> str:
        bias = "" if self.bias is None else f", bias {self.bias:+g}"
        targets = "" if self.targets is None else f", targets {self.targets}"
        return f"{self.loss} at scale {self.scale:.4g}{bias}{targets}"

    def step(self, backend: str, precision: str) -> str:
        """What the progress reports say, e.g. ``siglip chunked/bf16/scale 99/bias -10``."""
        where = f"{backend}/{precision}/scale {self.scale:.4g}"
        where = where if self.bias is None else f"{self.loss} {where}/bias {self.bias:+g}"
        return where if self.targets is None else f"{where}/{self.targets}"


@dataclass
class Truth:
    """The float64 truth of one case on the whole batch (``testing.ClipTruth`` or
    ``testing.SigLipTruth``, bounds for ``precision``), and the bound of each gradient
    tensor (``d_img``, ``d_txt``, and ``d_neg`` with negatives) from a plain fp32
    computation with the same operand rounding and the gradients' sizes before the
    normalisation's projection (:func:`palmtree.testing.tensor_bound`)."""

    exact: testing.ClipTruth | testing.SigLipTruth
    bounds: dict[str, float]

    @classmethod
    def compute(
        cls, case: Case, precision: str, img, txt, sizes, extras: Extras | None = None
    ) -> Truth:
        """Both on the batch's device, with the case's labels and negatives from ``extras``
        (:class:`~.targets.Extras`). The plain computation materialises the ``B x B``
        logits (and autograd's few copies of them); it is the worst of a few summation
        orders (:func:`palmtree.testing.worst_of_orders`), what plain fp32 can be relied
        on to achieve on any machine."""
        n = len(sizes)
        block = max(1, (1 << 25) // len(img)) if img.is_cuda else None  # fewer launches
        targets = extras.truth_kwargs(case.targets) if case.targets else {}
        negatives = targets.pop("negatives", None)
        kw = dict(sizes=sizes, precision=precision, **targets)
        if case.loss == "clip":
            exact = testing.clip_truth(
                img, txt, case.log_scale, block=block, negatives=negatives, **kw
            )

            def plain(i, t, **neg):
                return testing.plain_fp32(i, t, case.log_scale, **kw, **neg)
        else:
            exact = testing.siglip_truth(
                img, txt, case.log_scale, case.bias, block=block, negatives=negatives, **kw
            )

            def plain(i, t, **neg):
                return testing.plain_fp32_siglip(i, t, case.log_scale, case.bias, **kw, **neg)

        keys = ("d_img", "d_txt") + (() if negatives is None else ("d_neg",))
        tensors = {k: getattr(exact, k) for k in keys}
        try:
            worst = testing.worst_of_orders(plain, img, txt, tensors, negatives=negatives)
        except torch.OutOfMemoryError as exc:
            raise RuntimeError(
                f"the plain fp32 computation that bounds the gradient tensors holds the "
                f"{len(img)} x {len(img)} logits and does not fit on {img.device}; "
                "use a smaller --batch"
            ) from exc
        # Where the truth is 0 (D = 1: the normalisation's projection removes it all),
        # relative to the gradient before that projection: fp32 leaves its rounding.
        bounds = {
            k: testing.tensor_bound(n * worst[k], n * v, size=n * getattr(exact, f"{k}_size"))
            for k, v in tensors.items()
        }
        return cls(exact, bounds)
