"""Error of each operand-precision mode against float64, printed as a Markdown table.

    .venv/bin/python benchmarks/precision_error.py [--batch 4096] [--dim 512]

Correlated random pairs (a realistic loss, not zeros); the float64 reference is the
single-process loss on the same inputs. Errors are relative: |x - x64| / |x64| for the
loss and the scale's gradient, ||g - g64|| / ||g64|| (Frobenius) for the feature gradients.
The second scale sits just below the cap of 100.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import palmtree


def batch(big, dim, seed=0, noise=2.0):
    """Pairs with cosine ~1/sqrt(1 + noise^2) (noise 2: ~0.45)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(big, dim, generator=g, dtype=torch.float64)
    return base, base + noise * torch.randn(big, dim, generator=g, dtype=torch.float64)


def float64_loss(img, txt, log_scale):
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    ls = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
    logits = ls.exp() * F.normalize(i, dim=-1) @ F.normalize(t, dim=-1).T
    labels = torch.arange(len(img))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    return loss.detach(), i.grad, t.grad, ls.grad


def rel(a, b):
    return float((a.detach().double() - b).norm() / b.norm())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--backend", default="chunked")
    args = parser.parse_args()
    print(f"B={args.batch}, D={args.dim}, backend={args.backend}, device=cpu\n")
    print("| scale | loss (fp64) | precision | loss | d_image | d_text | d_scale |")
    print("|---|---|---|---|---|---|---|")
    # Noisier pairs at the larger scale keep the loss of order 1 (not saturated at 0).
    for scale, noise in ((1 / 0.07, 2.0), (99.0, 8.0)):
        img, txt = batch(args.batch, args.dim, noise=noise)
        log_scale = math.log(scale)
        exact = float64_loss(img, txt, log_scale)
        for precision in ("ieee", "tf32", "bf16"):
            i, t = img.float().requires_grad_(), txt.float().requires_grad_()
            ls = torch.tensor(log_scale, requires_grad=True)
            out = palmtree.clip_loss(i, t, ls, backend=args.backend, precision=precision)
            out.loss.backward()
            errs = [
                rel(x, y) for x, y in zip((out.loss, i.grad, t.grad, ls.grad), exact, strict=True)
            ]
            cells = " | ".join(f"{e:.1e}" for e in errs)
            print(f"| {scale:.1f} | {float(exact[0]):.3f} | {precision} | {cells} |")


if __name__ == "__main__":
    main()
