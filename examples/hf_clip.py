"""Hugging Face ``transformers`` CLIPModel trained with palmtree's loss, under DDP.

    pip install transformers
    torchrun --nproc-per-node 2 examples/hf_clip.py --steps 50   # gloo on CPU, NCCL on GPUs
    python examples/hf_clip.py --steps 50                        # one process

The model is built from a tiny ``CLIPConfig``: nothing is downloaded (with a real
checkpoint, ``CLIPModel.from_pretrained(...)`` changes nothing below).
``model(..., return_loss=True)`` computes the loss on each rank's own batch only, so
under DDP its negatives never cross ranks. The swap: take the projected features and
the model's log temperature, and let palmtree normalise, gather and reduce::

    image = model.get_image_features(pixel_values=pixels)
    text = model.get_text_features(input_ids=ids, attention_mask=mask)
    loss = palmtree.clip_loss(image, text, model.logit_scale).loss

(``transformers`` 5 returns the projected features as ``.pooler_output`` of an output
object, 4.x as a tensor; ``features`` below takes either.) Unlike HF, palmtree caps the
temperature at 100, as CLIP does.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import palmtree
from palmtree.launch_utils import init_process_group, shutdown_process_group

try:
    from transformers import CLIPConfig, CLIPModel
except ImportError as exc:  # pragma: no cover - the example says why and stops
    sys.exit(f"this example needs transformers (pip install transformers): {exc}")

CONCEPTS, VOCAB, LENGTH, IMAGE = 64, 96, 8, 16
PAD, BOS, EOS = 0, 1, 3  # EOS != 2: CLIP pools the text at the first EOS token


def tiny_clip() -> CLIPModel:
    config = CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=LENGTH, pad_token_id=PAD,
            bos_token_id=BOS, eos_token_id=EOS,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=IMAGE, patch_size=8, num_channels=3,
        ),
        projection_dim=16,
    )  # fmt: skip
    return CLIPModel(config)


def features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipWithExactLoss(nn.Module):
    """The HF model plus palmtree's loss in one forward, so DDP sees the whole step."""

    def __init__(self, clip: CLIPModel):
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values, input_ids, attention_mask):
        image = features(self.clip.get_image_features(pixel_values=pixel_values))
        text = features(
            self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        )
        return palmtree.clip_loss(image, text, self.clip.logit_scale)


def synthetic_batch(size: int, step: int, rank: int, device):
    """Pairs sharing a hidden concept: a noisy image pattern and a caption, BOS ... EOS."""
    world = torch.Generator().manual_seed(0)
    image_of = torch.randn(CONCEPTS, 3, IMAGE, IMAGE, generator=world)
    words_of = torch.randint(EOS + 1, VOCAB, (CONCEPTS, LENGTH - 2), generator=world)
    g = torch.Generator().manual_seed(1000 * step + rank)
    concept = torch.randint(0, CONCEPTS, (size,), generator=g)
    pixels = image_of[concept] + 0.5 * torch.randn(size, 3, IMAGE, IMAGE, generator=g)
    words = torch.randint(1, LENGTH - 1, (size,), generator=g)  # caption lengths
    ids = torch.full((size, LENGTH), PAD)
    ids[:, 0] = BOS
    pos = torch.arange(LENGTH - 2)[None, :]
    ids[:, 1:-1] = torch.where(pos < words[:, None], words_of[concept], PAD)
    ids[torch.arange(size), words + 1] = EOS
    mask = (torch.arange(LENGTH)[None, :] <= (words + 1)[:, None]).long()
    return pixels.to(device), ids.to(device), mask.to(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=32, help="pairs per rank (rank r gets r fewer)")
    p.add_argument("--lr", type=float, default=1e-3)
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
    # torch's gloo process group can otherwise outlive the run and abort or hang the
    # process at exit.
    init_process_group("nccl" if device.type == "cuda" else "gloo")
    train(args, device)  # returns with the DDP model gone, as the teardown needs
    shutdown_process_group()  # a barrier, then the group is destroyed
    return 0


def train(args, device) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)
    model = ClipWithExactLoss(tiny_clip()).to(device)
    if dist.is_initialized():
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    for step in range(1, args.steps + 1):
        batch = synthetic_batch(args.batch - rank, step, rank, device)
        out = model(*batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if rank == 0 and (step % 10 == 0 or step in (1, args.steps)):
            m = out.metrics()
            print(
                f"step {step:4d}/{args.steps}  loss {m['loss']:.4f}  acc i2t {m['acc_i2t']:.3f}  "
                f"scale {m['logit_scale']:.2f}  global batch {m['b_global']}",
                flush=True,
            )


if __name__ == "__main__":
    raise SystemExit(main())
