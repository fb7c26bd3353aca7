"""A Lightning module trained with palmtree's exact CLIP loss, on 2 DDP ranks.

    pip install lightning            # or pytorch-lightning
    python examples/lightning_clip.py --devices 2 --steps 50    # Lightning starts the ranks
    torchrun --nproc-per-node 2 examples/lightning_clip.py --devices 2 --steps 50

Nothing Lightning-specific is needed: ``training_step`` returns ``out.loss`` (this rank's
share of the global loss) and Lightning's DDP strategy averages the gradients, which
makes them exactly those of the loss on the global batch. The loss gathers negatives
from the default process group that Lightning sets up. Log ``out.loss_global``: it is
already reduced over ranks, so it needs no ``sync_dist``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import palmtree
from palmtree.launch_utils import shutdown_process_group

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError as exc:  # pragma: no cover - the example says why and stops
        raise SystemExit(f"this example needs Lightning (pip install lightning): {exc}") from exc

CONCEPTS, PIXELS, VOCAB, LENGTH = 64, 24, 100, 6


class LitClip(pl.LightningModule):
    def __init__(self, lr: float = 3e-3, width: int = 32, embed_dim: int = 16):
        super().__init__()
        self.lr = lr
        self.image = nn.Sequential(nn.Linear(PIXELS, 64), nn.GELU(), nn.Linear(64, width))
        self.tokens = nn.Embedding(VOCAB, width)
        self.loss = palmtree.ClipLoss(width, width, embed_dim)
        self.last_metrics: dict = {}

    def training_step(self, batch, batch_idx):
        pixels, tokens, mask = batch
        out = self.loss(self.image(pixels), self.tokens(tokens), text_mask=mask)
        self.log_dict(
            {"loss": out.loss_global, "acc_i2t": out.acc_i2t, "logit_scale": out.logit_scale},
            batch_size=out.b_local,
        )
        self.last_metrics = out.metrics()
        return out.loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def synthetic_pairs(count: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    image_of = torch.randn(CONCEPTS, PIXELS, generator=g)
    caption_of = torch.randint(1, VOCAB, (CONCEPTS, LENGTH), generator=g)
    concept = torch.randint(0, CONCEPTS, (count,), generator=g)
    pixels = image_of[concept] + 0.3 * torch.randn(count, PIXELS, generator=g)
    lengths = torch.randint(2, LENGTH + 1, (count,), generator=g)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    return TensorDataset(pixels, caption_of[concept] * mask, mask)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--accelerator", default="cpu", help="cpu (gloo), gpu or auto")
    p.add_argument("--batch", type=int, default=32, help="pairs per rank")
    args = p.parse_args(argv)

    summary = fit(args)  # returns with the trainer and its DDP model gone
    # Lightning leaves its process group to the interpreter's exit, where gloo's worker
    # threads can abort the process; end it here, as palmtree's own commands do (see
    # palmtree/launch_utils.py).
    shutdown_process_group()
    if summary is not None:
        print(summary, flush=True)
    return 0


def fit(args) -> str | None:
    """Trains; rank 0 returns its summary line, the other ranks ``None``."""
    torch.manual_seed(0)
    model = LitClip()
    data = DataLoader(synthetic_pairs(4096), batch_size=args.batch, shuffle=True)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.steps,
        log_every_n_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    if not trainer.is_global_zero:
        return None
    m = model.last_metrics
    return (
        f"step {trainer.global_step}/{args.steps}  loss {m['loss']:.4f}  "
        f"acc i2t {m['acc_i2t']:.3f}  scale {m['logit_scale']:.2f}  "
        f"global batch {m['b_global']} over {trainer.world_size} rank(s)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
