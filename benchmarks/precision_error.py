"""Error of each operand-precision mode against float64, printed as a Markdown table.

    .venv/bin/python benchmarks/precision_error.py [--batch 4096] [--dim 512]

Inputs are ``palmtree.testing.make_pairs``'s correlated pairs (a realistic loss, not
zeros) and the truth is ``palmtree.testing.clip_truth``, the float64 loss of one process
on the same inputs. Errors are relative: |x - x64| / |x64| for the loss and the scale's
gradient, ||g - g64|| / ||g64|| (Frobenius) for the feature gradients. "bounds" says
whether the loss and the scale's gradient lie within the error bounds ``testing`` derives
for an fp32 computation in that precision (docs/design.md, "What exact means"). The
second scale sits just below the cap of 100.
"""

from __future__ import annotations

import argparse
import math

import torch

import palmtree
from palmtree import testing


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    return float((a.detach().double() - b).norm() / b.norm())


def bounds(loss, d_scale, exact: testing.ClipTruth) -> str:
    """``within``, or which of the loss and the scale's gradient fell outside its bound."""
    outside = [
        name
        for name, ours, value, bound in (
            ("loss", loss, exact.loss, exact.loss_bound),
            ("d_scale", d_scale, exact.d_scale, exact.d_scale_bound),
        )
        if not testing.max_error(ours, value) <= bound
    ]
    return "outside: " + ", ".join(outside) if outside else "within"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--backend", default="chunked")
    args = parser.parse_args()
    print(f"B={args.batch}, D={args.dim}, backend={args.backend}, device=cpu\n")
    print("| scale | loss (fp64) | precision | loss | d_image | d_text | d_scale | bounds |")
    print("|---|---|---|---|---|---|---|---|")
    # Noisier pairs at the larger scale keep the loss of order 1 (not saturated at 0).
    for scale, noise in ((1 / 0.07, 2.0), (99.0, 8.0)):
        img, txt = testing.make_pairs(args.batch, args.dim, seed=0, noise=noise)
        log_scale = math.log(scale)
        for precision in ("ieee", "tf32", "bf16"):
            # The same float64 values each time; the bounds depend on the precision.
            exact = testing.clip_truth(img, txt, log_scale, precision=precision)
            i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
            ls = torch.tensor(log_scale, requires_grad=True)
            out = palmtree.clip_loss(i, t, ls, backend=args.backend, precision=precision)
            out.loss.backward()
            pairs = zip(
                (out.loss, i.grad, t.grad, ls.grad),
                (exact.loss, exact.d_img, exact.d_txt, exact.d_scale),
                strict=True,
            )
            cells = " | ".join(f"{rel(x, y):.1e}" for x, y in pairs)
            verdict = bounds(out.loss, ls.grad, exact)
            print(f"| {scale:.1f} | {float(exact.loss):.3f} | {precision} | {cells} | {verdict} |")


if __name__ == "__main__":
    main()
