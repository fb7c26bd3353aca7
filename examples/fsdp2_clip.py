"""FSDP2 (``fully_shard``) training with palmtree's exact CLIP loss.

    torchrun --nproc-per-node 2 examples/fsdp2_clip.py --steps 50     # gloo on CPU, NCCL on GPUs
    torchrun --nproc-per-node 2 examples/fsdp2_clip.py --bf16         # towers in bf16
    python examples/fsdp2_clip.py --steps 50                          # one process, unsharded

The palmtree lines are marked ``# palmtree``. The loss module sits inside the model;
``fully_shard`` goes on each tower, then on the root, which shards what is left: the
loss's temperature (a one-element parameter) and projections. Each rank backpropagates
``out.loss``: FSDP2 averages gradients over ranks as DDP does, so every parameter gets the
gradient of the loss on the whole global batch, though the ranks hold different numbers
of pairs here (rank r gets r fewer). With ``--bf16`` the towers compute in bf16 under a
``MixedPrecisionPolicy``, and the loss module is sharded on its own with fp32 parameters:
under the root's bf16 policy the loss would see its temperature rounded to bf16.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import palmtree  # palmtree
from palmtree.launch_utils import init_process_group, shutdown_process_group

CONCEPTS, PIXELS, VOCAB, LENGTH = 64, 24, 100, 6


class TwoTowers(nn.Module):
    """An MLP over "pixels" and token embeddings; ClipLoss projects and pools them."""

    def __init__(self, width: int = 32, embed_dim: int = 16):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(PIXELS, 64), nn.GELU(), nn.Linear(64, width))
        self.tokens = nn.Embedding(VOCAB, width)
        self.loss = palmtree.ClipLoss(width, width, embed_dim)  # palmtree

    def forward(self, pixels, tokens, mask):
        # Token latents [b, L, D] and their padding mask: the loss pools them (fp32).
        return self.loss(self.image(pixels), self.tokens(tokens), text_mask=mask)  # palmtree


def shard(model: TwoTowers, bf16: bool) -> None:
    """Each tower, then the root; with ``bf16``, the loss module apart in fp32."""
    towers = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if bf16 else MixedPrecisionPolicy()
    fully_shard(model.image, mp_policy=towers)
    fully_shard(model.tokens, mp_policy=towers)
    if bf16:  # palmtree: the temperature and the projections stay fp32
        fully_shard(model.loss, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32))
    fully_shard(model, mp_policy=towers)


def synthetic_batch(size: int, step: int, rank: int, device):
    """Pairs that share a hidden concept: a noisy image of it and a padded caption of it."""
    world = torch.Generator().manual_seed(0)  # the same concepts on every rank
    image_of = torch.randn(CONCEPTS, PIXELS, generator=world)
    caption_of = torch.randint(1, VOCAB, (CONCEPTS, LENGTH), generator=world)
    g = torch.Generator().manual_seed(1000 * step + rank)
    concept = torch.randint(0, CONCEPTS, (size,), generator=g)
    pixels = image_of[concept] + 0.3 * torch.randn(size, PIXELS, generator=g)
    lengths = torch.randint(2, LENGTH + 1, (size,), generator=g)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    tokens = caption_of[concept] * mask
    return pixels.to(device), tokens.to(device), mask.to(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=32, help="pairs per rank (rank r gets r fewer)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bf16", action="store_true", help="towers in bf16, the loss in fp32")
    args = p.parse_args(argv)

    launched = "RANK" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if not launched:
        train(args, device)
        return 0
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Set up and tear down as palmtree's own commands do (see palmtree/launch_utils.py):
    # torch's gloo process group can otherwise outlive the run and abort the process at exit.
    init_process_group("nccl" if device.type == "cuda" else "gloo")
    train(args, device)  # returns with the sharded model gone, as the teardown needs
    shutdown_process_group()  # a barrier, then the group is destroyed
    return 0


def train(args, device) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)  # the same initial weights everywhere (each rank keeps its shard)
    model = TwoTowers().to(device)
    if dist.is_initialized():
        shard(model, args.bf16)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    for step in range(1, args.steps + 1):
        pixels, tokens, mask = synthetic_batch(args.batch - rank, step, rank, device)
        out = model(pixels, tokens, mask)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()  # palmtree: each rank's share; FSDP2's average makes it exact
        opt.step()
        if rank == 0 and (step % 10 == 0 or step in (1, args.steps)):
            m = out.metrics()
            print(
                f"step {step:4d}/{args.steps}  loss {m['loss']:.4f}  acc i2t {m['acc_i2t']:.3f} "
                f"t2i {m['acc_t2i']:.3f}  scale {m['logit_scale']:.2f}  "
                f"global batch {m['b_global']}",
                flush=True,
            )


if __name__ == "__main__":
    raise SystemExit(main())
