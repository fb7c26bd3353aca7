"""Tiny CLIPModel/SiglipModel trained by ``palmtree.compat.transformers.Trainer``, and its truth.

Launched by tests/test_compat_transformers.py: ``torchrun --nproc-per-node 2
tests/hf_trainer_case.py OUT [CASE ...]`` (gloo on CPU). Every case trains one epoch with
SGD, recording on every rank each batch it was given (the dataset's indices), and before
each optimiser step the parameters and their gradients; then it evaluates. Rank 0 then
computes, in this one process with no collective, each step's gradients on that step's
global batch (every rank's micro-batches of the step) at the recorded parameters: in
float64 (the truth) and in plain fp32 (palmtree's loss on the whole batch), and the same
for each evaluation batch. Everything is saved to ``OUT/results.pt`` for the test to
compare. Nothing is downloaded: the configs are built here, as examples/hf_clip.py does.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import (
    CLIPConfig,
    CLIPModel,
    SiglipConfig,
    SiglipModel,
    TrainerCallback,
    TrainingArguments,
)

from palmtree import clip_loss, siglip_loss, testing
from palmtree.compat.transformers import Trainer, _setup_problem

VOCAB, LENGTH, IMAGE = 40, 6, 16
#: name: (loss, gradient_accumulation_steps, training pairs, evaluation pairs). With 2
#: ranks and 2 pairs per device a global batch holds 4: 7 pairs end on a batch of 2 + 1,
#: 11 pairs on 3 micro-batches (the last optimiser step accumulates only the uneven one).
CASES = {
    "clip": ("clip", 1, 7, 7),
    "siglip_accumulated": ("siglip", 2, 11, 6),
    "clip_accumulated": ("clip", 2, 11, 5),
}
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def tiny(kind: str):
    torch.manual_seed(0)
    text = dict(TOWER, vocab_size=VOCAB, max_position_embeddings=LENGTH)
    text.update(pad_token_id=0, bos_token_id=1, eos_token_id=3)  # CLIP pools at EOS
    vision = dict(TOWER, image_size=IMAGE, patch_size=8, num_channels=3)
    if kind == "clip":
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    return SiglipModel(SiglipConfig(text_config=text, vision_config=vision))


class Pairs(torch.utils.data.Dataset):
    """Pair ``i`` is a function of ``i`` alone; items carry their index for the record."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 * self.seed + i)
        ids = torch.randint(4, VOCAB, (LENGTH,), generator=g)
        ids[0], ids[-1] = 1, 3
        return {
            "index": i,
            "pixel_values": torch.randn(3, IMAGE, IMAGE, generator=g),
            "input_ids": ids,
            "attention_mask": torch.ones(LENGTH, dtype=torch.long),
        }


def collate(items, seen=None):
    if seen is not None:
        seen.append([item["index"] for item in items])
    keys = ("pixel_values", "input_ids", "attention_mask")
    return {k: torch.stack([item[k] for item in items]) for k in keys}


class Snapshots(TrainerCallback):
    """Parameters and gradients just before each optimiser step (after DDP's average)."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        self.steps.append((params, grads))


def arguments(out: str, accumulation: int = 1, **kw) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=1,
        learning_rate=0.01,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        dataloader_drop_last=False,
        remove_unused_columns=False,
        use_cpu=True,
        ddp_backend="gloo",
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=3,
        **kw,
    )


def run_case(name: str, out: str) -> dict:
    kind, accumulation, n_train, n_eval = CASES[name]
    seen, snapshots = [], Snapshots()
    trainer = Trainer(
        model=tiny(kind),
        args=arguments(os.path.join(out, name), accumulation),
        train_dataset=Pairs(n_train, seed=1),
        eval_dataset=Pairs(n_eval, seed=2),
        data_collator=lambda items: collate(items, seen),
        callbacks=[snapshots],
    )
    trainer.train()
    train_batches, seen[:] = list(seen), []
    metrics = trainer.evaluate()
    final = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return dict(
        train_batches=train_batches,
        eval_batches=list(seen),
        steps=snapshots.steps,
        metrics=metrics,
        final=final,
    )


def step_batches(per_rank: list[list[list[int]]], accumulation: int) -> list[list[list[int]]]:
    """Each optimiser step's indices per rank: ``k`` consecutive batches of every rank."""
    count = len(per_rank[0])
    assert all(len(b) == count for b in per_rank), "ranks were given different numbers of batches"
    return [
        [sum(batches[s : s + accumulation], []) for batches in per_rank]
        for s in range(0, count, accumulation)
    ]


def features(model, dataset, indices, dtype):
    batch = collate([dataset[i] for i in indices])
    out = model(
        pixel_values=batch["pixel_values"].to(dtype),
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        return_loss=False,
    )
    return out.image_embeds, out.text_embeds


def float64_loss(kind: str, img, txt, model):
    """The loss of the whole batch in float64, plainly (materialised logits)."""
    u, v = F.normalize(img, dim=1, eps=1e-6), F.normalize(txt, dim=1, eps=1e-6)
    scale = model.logit_scale.reshape(()).exp()
    labels = torch.arange(len(u))
    if kind == "clip":
        logits = scale.clamp(max=100.0) * u @ v.T
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    z = 2 * torch.eye(len(u), dtype=u.dtype) - 1
    logits = scale * u @ v.T + model.logit_bias.reshape(())
    return F.softplus(-z * logits).sum() / len(u)


def plain_loss(kind: str, img, txt, model):
    """palmtree's loss of the whole batch in this one process (no collective)."""
    if kind == "clip":
        return clip_loss(img, txt, model.logit_scale, distributed=False)
    return siglip_loss(img, txt, model.logit_scale, model.logit_bias, distributed=False)


def truth_of(kind: str, img32, txt32, model, sizes):
    theta = float(model.logit_scale.detach().reshape(()))
    if kind == "clip":
        return testing.clip_truth(img32, txt32, theta, sizes=sizes)
    bias = float(model.logit_bias.detach().reshape(()))
    return testing.siglip_truth(img32, txt32, theta, bias, sizes=sizes)


def models_at(kind: str, params: dict):
    out = []
    for dtype in (torch.float32, torch.float64):
        model = tiny(kind).to(dtype)
        model.load_state_dict({n: p.to(dtype) for n, p in params.items()}, strict=False)
        out.append(model)
    return out


def step_truth(kind: str, params: dict, dataset, ranks: list[list[int]]) -> dict:
    """One step's gradients on its global batch: float64, plain fp32, scalar bounds."""
    indices = sum(ranks, [])
    m32, m64 = models_at(kind, params)
    img32, txt32 = features(m32, dataset, indices, torch.float32)
    plain_loss(kind, img32, txt32, m32).loss.backward()
    float64_loss(kind, *features(m64, dataset, indices, torch.float64), m64).backward()
    truth = truth_of(kind, img32.detach(), txt32.detach(), m32, [len(r) for r in ranks])
    bounds = {"logit_scale": truth.d_scale_bound}
    if kind == "siglip":
        bounds["logit_bias"] = truth.d_bias_bound
    grads = [{n: p.grad.clone() for n, p in m.named_parameters()} for m in (m64, m32)]
    return dict(exact=grads[0], plain=grads[1], bounds=bounds)


@torch.no_grad()
def eval_truth(kind: str, params: dict, dataset, ranks: list[list[int]]) -> dict:
    """One evaluation batch: its size, float64 loss and accuracies, plain fp32 loss, bound."""
    indices = sum(ranks, [])
    m32, m64 = models_at(kind, params)
    img32, txt32 = features(m32, dataset, indices, torch.float32)
    img64, txt64 = features(m64, dataset, indices, torch.float64)
    sims = F.normalize(img64, dim=1) @ F.normalize(txt64, dim=1).T
    target = torch.arange(len(indices))
    truth = truth_of(kind, img32, txt32, m32, [len(r) for r in ranks])
    return dict(
        pairs=len(indices),
        exact=float(float64_loss(kind, img64, txt64, m64)),
        plain=float(plain_loss(kind, img32, txt32, m32).loss_global),
        loss_bound=truth.loss_bound,
        acc_i2t=float((sims.argmax(1) == target).double().mean()),
        acc_t2i=float((sims.argmax(0) == target).double().mean()),
    )


def truths(name: str, records: list[dict]) -> dict:
    kind, accumulation, n_train, n_eval = CASES[name]
    train = step_batches([r["train_batches"] for r in records], accumulation)
    evals = step_batches([r["eval_batches"] for r in records], 1)
    steps = records[0]["steps"]
    assert len(steps) == len(train), (len(steps), len(train))
    return dict(
        train=train,
        evals=evals,
        steps=[
            step_truth(kind, p, Pairs(n_train, 1), b)
            for (p, _), b in zip(steps, train, strict=True)
        ],
        eval=[eval_truth(kind, records[0]["final"], Pairs(n_eval, 2), b) for b in evals],
    )


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return (Pairs(4, 1)[i] for i in range(4))


def stub(accumulation=1, fp16=False, fsdp=False):
    """What ``_setup_problem`` reads of a Trainer, for settings a CPU cannot construct."""
    return SimpleNamespace(
        args=SimpleNamespace(gradient_accumulation_steps=accumulation),
        accelerator=SimpleNamespace(scaler=object() if fp16 else None),
        is_deepspeed_enabled=False,
        is_fsdp_enabled=fsdp,
        is_fsdp_xla_enabled=False,
        compute_loss_func=None,
        compute_metrics=None,
    )


def refusals(out: str) -> dict:
    """``{what: (exception type, message)}`` for arguments the Trainer must refuse."""
    bad = {
        "compute_metrics": dict(compute_metrics=lambda p: {}),
        "compute_loss_func": dict(compute_loss_func=lambda *a, **k: None),
        "loss": dict(loss="softmax"),
        "loss_options_name": dict(loss_options={"bakend": "chunked"}),
        "loss_options_value": dict(loss_options={"backend": "nope"}),
    }
    found = {}
    for what, kw in bad.items():
        try:
            Trainer(model=tiny("clip"), args=arguments(os.path.join(out, what)), **kw)
        except Exception as exc:
            found[what] = (type(exc).__name__, str(exc))
    trainer = Trainer(
        model=tiny("clip"), args=arguments(os.path.join(out, "stream"), max_steps=1),
        train_dataset=Stream(),
        data_collator=collate,
    )  # fmt: skip
    try:
        trainer.train()
    except Exception as exc:
        found["iterable"] = (type(exc).__name__, str(exc))
    found["fp16_accumulation"] = ("", _setup_problem(stub(accumulation=2, fp16=True)))
    found["fp16"] = ("", _setup_problem(stub(fp16=True)))
    found["fsdp"] = ("", _setup_problem(stub(fsdp=True)))
    return found


def main(out: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    gathered = {}
    for name in names:
        mine = refusals(out) if name == "refusals" else run_case(name, out)
        gathered[name] = [mine]
        if dist.is_initialized():  # by the first Trainer (accelerate), under torchrun
            gathered[name] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered[name], mine)
    if not dist.is_initialized() or dist.get_rank() == 0:
        results = {
            name: records
            if name == "refusals"
            else dict(ranks=records, truth=truths(name, records))
            for name, records in gathered.items()
        }
        torch.save(results, os.path.join(out, "results.pt"))
    if dist.is_initialized():
        dist.barrier()  # the other ranks wait for rank 0's truths, then all leave together
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or [*CASES, "refusals"])
