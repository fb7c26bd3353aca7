"""FSDP2 (``torch.distributed.fsdp.fully_shard``) around a model that holds the loss module,
on 2 and 3 spawned gloo ranks, against one process on the global batch; and the modules'
state dicts from before their scalars became ``[1]``-shaped.

``fully_shard`` refuses 0-dim parameters, so ``logit_scale``/``logit_bias`` are 1-D with one
element. FSDP2 averages gradients over ranks as DDP does, so each rank's ``N * share_r``
leaves every parameter the gradient of the whole global batch, for uneven and empty ranks.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from towers import TwoTower, check_gradients, float64_loss, gradients, split, tower_batch
from world import World

import palmtree
from palmtree import testing

#: Uneven splits, each with a rank that holds no pairs in one of them.
SPLITS = {2: [[5, 3], [0, 6]], 3: [[4, 0, 3], [2, 5, 2]]}
STEPS, LR, WD = 3, 1e-2, 0.1


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"N{n}")
def world(request):
    w = World(request.param)
    yield w
    w.close()


def batch(sizes, step):
    """The global batch of ``step``, cut into the ranks' pieces."""
    return split(tower_batch(sum(sizes), seed=5 + step), sizes)


def fsdp_steps(rank, n, loss, sizes):
    """``fully_shard`` on each tower, then on the root (which holds the loss module);
    ``STEPS`` AdamW steps. Returns the first step's gradients and the parameters after the
    last step, gathered whole from their shards (FSDP2 keeps both as sharded DTensors)."""
    from torch.distributed.fsdp import fully_shard

    model = TwoTower("chunked", loss)
    fully_shard(model.towers.image)
    fully_shard(model.towers.text)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    for step in range(STEPS):
        out = model(*batch(sizes, step)[rank])
        out.loss.backward()
        if step == 0:
            grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    params = {name: p.detach().full_tensor() for name, p in model.named_parameters()}
    return {"grads": grads, "params": params, "b_global": out.b_global}


def single_process_steps(loss, sizes):
    """The same model and steps in one process on the global batches: ``(exact, plain)``
    parameters, float64 with the plain formula and fp32 with palmtree's loss."""
    out = []
    for dtype in (torch.float64, torch.float32):
        model = TwoTower("chunked", loss).to(dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
        for step in range(STEPS):
            pixels, tokens, mask = tower_batch(sum(sizes), seed=5 + step)
            img, txt, mask = model.towers(pixels.to(dtype), tokens, mask)
            if dtype == torch.float32:
                model.loss(img, txt, mask).loss.backward()
            else:
                pooled = palmtree.masked_mean_pool(model.loss.text_proj(txt), mask)
                float64_loss(loss, model.loss.image_proj(img), pooled, model.loss).backward()
            opt.step()
            opt.zero_grad()
        out.append({name: p.detach().clone() for name, p in model.named_parameters()})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_fsdp2_gradients_and_steps_equal_single_process(world, loss):
    """After ``backward`` every parameter holds the float64 gradient of the global batch
    (:func:`towers.check_gradients`'s bounds, as for DDP).

    After 3 AdamW steps each parameter is as close to the float64 run's as one fp32
    process's is (twice its error, plus 1e-6 of the largest value: the fp32 parameters'
    own rounding), the rule of :func:`palmtree.testing.check_tensor`. Adam divides by the
    gradient's root mean square, which magnifies rounding where a gradient is near 0 in
    both fp32 runs alike, so no bound fixed in advance would be sound; and it makes the
    step blind to a gradient's overall scale, which the gradient check covers."""
    for sizes in SPLITS[world.size]:
        results = world.run(fsdp_steps, loss, sizes)
        pieces = [[piece] for piece in batch(sizes, 0)]
        exact, plain, bounds = gradients(loss, "chunked", pieces)
        exact_steps, plain_steps = single_process_steps(loss, sizes)
        for rank, r in enumerate(results):
            where = f" on rank {rank} of {sizes}"
            assert r["b_global"] == sum(sizes)
            assert r["grads"]["loss.logit_scale"].shape == (1,)
            check_gradients(r["grads"], exact, plain, bounds, where)
            for name, want in exact_steps.items():
                label = f"{name} after {STEPS} steps{where}"
                testing.check_tensor(label, r["params"][name], plain_steps[name], want)


# --------------------------------------------------------------------- 0-dim state dicts


@pytest.mark.parametrize("cls", [palmtree.ClipLoss, palmtree.SigLipLoss])
def test_a_state_dict_with_0dim_scalars_loads(cls):
    """A state dict as the modules wrote it before (0-dim ``logit_scale``/``logit_bias``)
    loads into today's ``[1]``-shaped parameters, strictly, with its values."""
    module = cls(image_dim=10, text_dim=7, embed_dim=8)
    old = {name: torch.randn(p.shape) for name, p in module.state_dict().items()}
    old["logit_scale"] = torch.tensor(1.5)
    if cls is palmtree.SigLipLoss:
        old["logit_bias"] = torch.tensor(-7.0)
    module.load_state_dict(old)  # strict: nothing missing, nothing left over
    assert module.logit_scale.shape == (1,) and module.logit_scale.item() == 1.5
    assert torch.equal(module.image_proj.weight, old["image_proj.weight"])
    if cls is palmtree.SigLipLoss:
        assert module.logit_bias.shape == (1,) and module.logit_bias.item() == -7.0
    assert old["logit_scale"].shape == ()  # the caller's dict is left as it was
    with pytest.raises(RuntimeError, match=r"size mismatch for logit_scale"):
        module.load_state_dict({**old, "logit_scale": torch.ones(2)})


TINY = ["--nproc", "1", "--epochs", "1", "--batch-size", "100", "--no-progress"]
TINY += ["--image-width", "8", "--image-dim", "16", "--text-width", "16"]
TINY += ["--text-layers", "1", "--embed-dim", "16", "--warmup", "1"]


def as_before(path) -> int:
    """Rewrites a ``palmtree train`` checkpoint as the code before ``[1]``-shaped scalars
    wrote it: 0-dim loss scalars and 0-dim AdamW moments for them. Returns how many
    tensors it changed."""
    state = torch.load(path, weights_only=True)
    changed = 0
    for name, value in state["model"].items():
        if name.startswith("loss_fn.logit_") and value.shape == (1,):
            state["model"][name], changed = value.reshape(()), changed + 1
    for moments in state["optimizer"]["state"].values():
        for key, value in moments.items():
            if key != "step" and value.shape == (1,):
                moments[key], changed = value.reshape(()), changed + 1
    torch.save(state, path)
    return changed


@pytest.mark.slow
def test_resume_of_a_checkpoint_with_0dim_scalars(tmp_path):
    """``palmtree train --resume`` of a checkpoint from before continues as the resume of
    today's checkpoint does, bit for bit (SigLIP: both scalars, and their moments)."""
    from palmtree.train import main

    common = [*TINY, "--logs", str(tmp_path), "--loss", "siglip"]
    assert main([*common, "--name", "new", "--max-steps", "2"]) == 0
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    assert as_before(tmp_path / "old" / "checkpoints" / "latest.pt") == 2 * 3
    rows = {}
    for name in ("new", "old"):
        assert main([*common, "--name", name, "--resume", "--max-steps", "3"]) == 0
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        rows[name] = [
            {k: v for k, v in json.loads(line).items() if k != "samples_per_s"} for line in lines
        ]
    assert [r["step"] for r in rows["old"] if r["kind"] == "train"] == [1, 2, 3]
    assert rows["old"] == rows["new"] and all(math.isfinite(r["loss"]) for r in rows["old"])
