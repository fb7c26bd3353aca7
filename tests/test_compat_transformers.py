"""``palmtree.compat.transformers.Trainer``: HF's Trainer, exact on 2 gloo ranks.

One torchrun launch (tests/hf_trainer_case.py) trains a tiny ``CLIPModel`` and a tiny
``SiglipModel`` (``[1]``-shaped ``logit_scale``/``logit_bias``) for one epoch on 2 ranks,
with and without gradient accumulation, on datasets whose last global batch is uneven,
then evaluates; it also builds Trainers with arguments that must be refused. Rank 0
computes each step's truth in one process. Here: every rank got the dataset's own
batches (no pair repeated or lost), the gradients before every optimiser step equal
those of one float64 process on the step's global batch, and ``eval_loss`` is the
global loss. The batch sampler is also checked alone, without a launch.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from palmtree import testing

HERE = Path(__file__).resolve().parent
MISSING = [m for m in ("transformers", "accelerate") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"{' and '.join(MISSING)} missing (pip install 'stunning-palm-tree[transformers]')",
)
#: The attention's key bias has an exactly zero gradient (a softmax does not move when
#: every key of a query shifts by the same q . b); its fp32 rounding is relative to the
#: keys' gradients, whose size the key weight's gradient of the same layer gives.
STRUCTURAL_ZEROS = ("self_attn.k_proj.bias",)


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """The 2-rank run's records and truths (``OUT/results.pt``) and its stderr."""
    out = tmp_path_factory.mktemp("hf_trainer")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(HERE / "hf_trainer_case.py"), str(out)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the torchrun launch did not finish:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    assert proc.returncode == 0, f"the torchrun launch failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return torch.load(out / "results.pt", weights_only=False), stderr


#: Each case's pairs per rank in each global batch (2 per device on 2 ranks), as a single
#: process would batch the same order: training (7 or 11 pairs, shuffled), then evaluation
#: (7, 6 or 5 pairs, in order; of 5, the last pair alone cannot fill 2 ranks).
BATCHES = {
    "clip": ([[2, 2], [2, 1]], [[2, 2], [2, 1]]),
    "siglip_accumulated": ([[2, 2], [2, 2], [2, 1]], [[2, 2], [1, 1]]),
    "clip_accumulated": ([[2, 2], [2, 2], [2, 1]], [[2, 2]]),
}

#: Each case's ``gradient_accumulation_steps``.
ACCUMULATION = {"clip": 1, "siglip_accumulated": 2, "clip_accumulated": 2}


def trained(launch):
    results, _ = launch
    return {name: case for name, case in results.items() if name != "refusals"}


@pytest.mark.slow
def test_every_rank_gets_the_datasets_own_batches(launch):
    """Every rank is given the same number of batches; each epoch holds every pair once; the
    last global batch is split 2 + 1 (or 1 + 1), not padded with repeated pairs
    (accelerate's default) nor left to one rank (its ``even_batches=False``)."""
    results, stderr = launch
    assert set(trained(launch)) == set(BATCHES)
    for name, case in trained(launch).items():
        for phase, want in zip(("train", "eval"), BATCHES[name], strict=True):
            per_rank = [rank[f"{phase}_batches"] for rank in case["ranks"]]
            sizes = [[len(b) for b in batches] for batches in zip(*per_rank, strict=True)]
            assert sizes == want and len(per_rank[0]) == len(per_rank[1]), (name, phase, per_rank)
            pairs = sorted(i for batches in per_rank for b in batches for i in b)
            assert pairs == list(range(sum(map(sum, want)))), (name, phase, per_rank)
    assert "1 pair(s) of the evaluation dataset (5 pairs) are left out" in stderr


@pytest.mark.slow
def test_gradients_equal_one_float64_process(launch):
    """Before every optimiser step, both ranks hold the same gradients, and they are those
    of one float64 process on the step's global batch (all ``k`` micro-batches of every
    rank), within 2x the plain fp32 error for each of the step's ``P`` partial gradients
    (one per rank and micro-batch, towers.py's rule for one): each is an fp32 backward
    like the plain one on a part of the batch, and summed their errors add up. The
    gradients of attention's keys cancel (every key of a query may shift alike), so
    their rounding stays that of the terms, which P separate backwards round apart."""
    for name, case in trained(launch).items():
        partials = len(case["ranks"]) * ACCUMULATION[name]
        steps = case["truth"]["steps"]
        assert len(steps) == len(case["ranks"][0]["steps"]) >= 2
        for s, truth in enumerate(steps):
            grads = [rank["steps"][s][1] for rank in case["ranks"]]
            for param, got in grads[0].items():
                assert torch.equal(got, grads[1][param]), f"{name} step {s}: {param} differs"
                check_gradient(f"{name} step {s}: {param}", param, got, truth, partials)


def check_gradient(label: str, param: str, got, truth, partials: int) -> None:
    exact, plain = truth["exact"][param], truth["plain"][param]
    if got.numel() == 1:
        bound = testing.max_error(plain, exact) + 2 * truth["bounds"][param]
        testing.check_scalar(label, got, exact, bound)
    elif param.endswith(STRUCTURAL_ZEROS):
        size = float(truth["exact"][param[: -len("bias")] + "weight"].abs().max())
        zero = torch.zeros_like(exact)
        testing.check_tensor(label, got, plain, zero, factor=2 * partials, size=size)
    else:
        testing.check_tensor(label, got, plain, exact, factor=2 * partials)


@pytest.mark.slow
def test_eval_loss_is_the_global_loss(launch):
    """``eval_loss`` is the mean over the evaluation's global batches of their float64 loss,
    weighted by their sizes, within the plain fp32 error plus twice the loss's bound;
    the accuracies are the float64 argmax's; every rank reports the same."""
    for name, case in trained(launch).items():
        batches = case["truth"]["eval"]
        pairs = sum(b["pairs"] for b in batches)
        exact = sum(b["pairs"] * b["exact"] for b in batches) / pairs
        bound = sum(
            b["pairs"] * (abs(b["plain"] - b["exact"]) + 2 * b["loss_bound"]) for b in batches
        )
        for rank in case["ranks"]:
            metrics = rank["metrics"]
            testing.check_scalar(
                f"{name} eval_loss", metrics["eval_loss"], torch.tensor(exact), bound / pairs
            )
            for acc in ("acc_i2t", "acc_t2i"):
                want = sum(b["pairs"] * b[acc] for b in batches) / pairs
                assert metrics[f"eval_{acc}"] == pytest.approx(want, abs=1e-6), (name, acc)


#: What each refused setting must say (on every rank): the exception and words of its message.
REFUSED = {
    "compute_metrics": ("ValueError", "compute_metrics is not supported"),
    "compute_loss_func": ("ValueError", "compute_loss_func is not used"),
    "loss": ("ValueError", "loss must be None, 'clip' or 'siglip', got 'softmax'"),
    "loss_options_name": ("TypeError", "loss_options: "),
    "loss_options_value": ("ValueError", "'nope'"),
    "iterable": ("ValueError", "IterableDataset on several ranks needs dataloader_drop_last"),
    "fp16_accumulation": ("", "fp16 loss scaling with gradient_accumulation_steps > 1"),
    "fsdp": ("", "FSDP and DeepSpeed are not supported"),
}


@pytest.mark.slow
def test_what_cannot_be_exact_is_refused_on_every_rank(launch):
    results, _ = launch
    for rank, found in enumerate(results["refusals"]):
        assert found["fp16"] == ("", None), found["fp16"]  # fp16 alone is fine
        for what, (kind, words) in REFUSED.items():
            assert what in found, f"rank {rank}: {what} was accepted"
            assert found[what][0] == kind and words in found[what][1], (rank, what, found[what])


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("per_rank", [1, 2, 5])
@pytest.mark.parametrize("drop_last", [False, True])
def test_global_batches_partition_each_epoch(world_size, per_rank, drop_last):
    """Every rank gets as many batches as the others, none empty; joined rank by rank, an
    epoch's batches are its order (the same on every rank), each pair once; only a last
    global batch of fewer pairs than ranks is left out (and warned about), or with
    ``drop_last`` any incomplete one. Another epoch is another order."""
    from palmtree.compat.hf_batches import GlobalBatches

    for size in range(3 * per_rank * world_size + 2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ranks = [
                GlobalBatches(
                    size, per_rank, world_size, r, shuffle=True, seed=7, drop_last=drop_last
                )
                for r in range(world_size)
            ]
        tail = size % (per_rank * world_size)
        left_out = tail if drop_last or tail < world_size else 0
        warned = 0 < left_out and not drop_last  # once per rank's sampler
        assert len(caught) == world_size * warned, [str(w.message) for w in caught]
        orders = []
        for epoch in (0, 1):
            for sampler in ranks:
                sampler.set_epoch(epoch)
            batches = [list(sampler) for sampler in ranks]
            assert all(len(b) == len(ranks[0]) for b in batches), (size, batches)
            assert all(len(batch) > 0 for b in batches for batch in b), (size, batches)
            steps = zip(*batches, strict=True)
            joined = [i for step in steps for batch in step for i in batch]
            orders.append(ranks[0].order())
            assert joined == orders[-1][: size - left_out], (size, batches)
            assert sorted(orders[-1]) == list(range(size))
        assert orders[0] != orders[1] or size < 6, size


def test_importing_palmtree_does_not_import_transformers():
    code = (
        "import sys, palmtree, palmtree.compat, palmtree.compat.open_clip; "
        "print([m for m in ('transformers', 'accelerate') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
