"""Hugging Face ``Trainer`` for ``CLIPModel``/``SiglipModel``: the exact global loss on any ranks.

Replace ``from transformers import Trainer`` with
``from palmtree.compat.transformers import Trainer``; nothing else changes. The model's
own ``return_loss=True`` loss sees only each rank's batch; this ``Trainer`` computes
palmtree's loss over the global batch of every rank instead (CLIP's softmax loss, or
SigLIP's sigmoid loss for a model with a ``logit_bias``, such as ``SiglipModel``), and:

* **through the wrapped model**: the features come from ``model(**inputs,
  return_loss=False)`` on the model ``Trainer`` wrapped (DDP), so its backward
  synchronises every gradient (``get_image_features`` on the bare model would not);
  ``logit_scale``/``logit_bias`` (0-d or HF's ``[1]``-shaped) are read from the model;
* **with the dataset's own batches**: each global batch is ``per_device_*_batch_size *
  world_size`` pairs, split over the ranks; the last one (``dataloader_drop_last=False``)
  is split as evenly as possible, never padded with repeated pairs (see
  :mod:`.hf_batches`); ``train_sampling_strategy="sequential"`` keeps the dataset's order;
* **with exact gradient accumulation**: with ``gradient_accumulation_steps = k > 1`` one
  optimiser step takes the loss of the global batch of all ``k`` micro-batches of every
  rank, through :func:`palmtree.accumulate` (two forwards of each micro-batch, one
  backward, one loss); plain accumulation would give each micro-batch only its own
  negatives;
* **with ``eval_loss``**: ``evaluate()`` reports ``eval_loss`` (and ``eval_acc_i2t``,
  ``eval_acc_t2i``): the mean of the global loss of each evaluation batch, weighted by the
  batch's number of pairs. Predictions are not returned (``compute_metrics`` is refused).

What each rank backpropagates is its ``world_size * share_r``, so DDP's average is the
gradient of the one loss of the global batch; the logged training loss is that loss.
Supported: one process and DDP (CPU or GPU, bf16 or fp32); refused with a clear error:
FSDP, DeepSpeed and XLA (use palmtree's loss inside your own loop there), fp16 loss
scaling together with gradient accumulation, and ``compute_loss_func``. palmtree caps the
CLIP temperature at 100 as CLIP does (HF does not; ``loss_options={"logit_scale_max":
math.inf}`` follows HF); SigLIP's is not capped.

Needs ``pip install 'stunning-palm-tree[transformers]'`` (transformers and accelerate);
``import palmtree`` does not import this module.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from torch.utils.data import IterableDataset

from ..accumulate import accumulate
from ..loss import clip_loss_with
from ..options import LossOptions
from ..siglip import NO_CAP, siglip_loss_with
from .hf_batches import GlobalBatches, unsharded

__all__ = ["Trainer"]

#: The model's forward arguments this ``Trainer`` sets itself.
_OWN_INPUTS = ("return_loss", "labels")


class Trainer(transformers.Trainer):
    """``transformers.Trainer`` whose loss is palmtree's, exact over every rank's batch.

    Args:
        *args, **kwargs: those of ``transformers.Trainer``.
        loss: ``"clip"`` or ``"siglip"``; ``None`` picks SigLIP for a model that has a
            ``logit_bias`` (``SiglipModel``), CLIP otherwise.
        loss_options: palmtree's loss options (``backend``, ``precision``,
            ``chunk_size``, ``logit_scale_max``, ``check_finite``...; see
            :class:`palmtree.options.LossOptions`) as a dict.

    The model's forward must take the batch's keys and ``return_loss`` and return
    ``image_embeds`` and ``text_embeds`` (CLIPModel, SiglipModel and their kin do).
    """

    def __init__(self, *args, loss: str | None = None, loss_options: dict | None = None, **kw):
        super().__init__(*args, **kw)
        if loss not in (None, "clip", "siglip"):
            raise ValueError(f"loss must be None, 'clip' or 'siglip', got {loss!r}")
        self.contrastive_loss = loss
        self.loss_options = dict(loss_options or {})
        problem = _setup_problem(self)
        if problem is not None:
            raise ValueError(f"palmtree.compat.transformers.Trainer: {problem}")
        # Checked here, so that bad options fail now and not at the first step.
        self._options = {kind: _options(kind, self.loss_options) for kind in ("clip", "siglip")}
        self._pending: list[dict] = []
        self._eval_sums: torch.Tensor | None = None
        self._batches: GlobalBatches | None = None

    # -- the loss -------------------------------------------------------------------------

    def contrastive(self, model: nn.Module, inputs: dict):
        """``(outputs, record)``: the (wrapped) model's outputs and palmtree's loss record."""
        outputs = model(**_model_inputs(inputs), return_loss=False)
        return outputs, self._loss(outputs.image_embeds, outputs.text_embeds)

    def _loss(self, image: torch.Tensor, text: torch.Tensor):
        bare = self.accelerator.unwrap_model(self.model)
        kind = self.contrastive_loss or ("siglip" if hasattr(bare, "logit_bias") else "clip")
        opts = self._options[kind]
        if kind == "clip":
            return clip_loss_with(opts, image, text, bare.logit_scale)
        return siglip_loss_with(opts, image, text, bare.logit_scale, bare.logit_bias)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """This rank's ``world_size * share_r`` of the global loss (``num_items_in_batch`` is
        not used: the loss is normalised over the global batch already)."""
        outputs, out = self.contrastive(model, inputs)
        return (out.loss, outputs) if return_outputs else out.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """With gradient accumulation, keeps each micro-batch until the step's last, then
        computes the whole step's gradient at once (:func:`palmtree.accumulate`); returns
        0 for the kept ones and this rank's ``world_size * share_r`` for the last."""
        if self.args.gradient_accumulation_steps == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        self._pending.append(inputs)
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        micro_batches, self._pending = self._pending, []
        model.train()
        encode = _Embeddings(model)
        batches = [(self._prepare_inputs(b),) for b in micro_batches]
        # accumulate averages the gradients over the ranks itself, in one all-reduce.
        with self.compute_loss_context_manager(), self.accelerator.no_sync(model):
            out = accumulate(encode, self._loss, batches)
        return out.loss.detach()

    # -- evaluation -----------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The global loss of this evaluation batch (no predictions); adds it, weighted by
        the global batch size, to the sums :meth:`evaluation_loop` reports."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            _, out = self.contrastive(model, inputs)
        if self._eval_sums is not None:
            values = torch.stack([out.loss_global, out.acc_i2t, out.acc_t2i, out.loss.new_ones(())])
            self._eval_sums += values.detach().double().cpu() * out.b_global
        return out.loss_global.detach(), None, None

    def evaluation_loop(self, dataloader, *args, metric_key_prefix: str = "eval", **kw):
        """``transformers.Trainer.evaluation_loop``, its ``<prefix>_loss`` replaced by the
        exact mean over the global batches (weighted by their sizes), plus accuracies."""
        self._eval_sums = torch.zeros(4, dtype=torch.float64)
        try:
            output = super().evaluation_loop(
                dataloader, *args, metric_key_prefix=metric_key_prefix, **kw
            )
            loss, acc_i2t, acc_t2i, pairs = self._eval_sums.tolist()
        finally:
            self._eval_sums = None
        if pairs > 0:
            output.metrics[f"{metric_key_prefix}_loss"] = loss / pairs
            output.metrics[f"{metric_key_prefix}_acc_i2t"] = acc_i2t / pairs
            output.metrics[f"{metric_key_prefix}_acc_t2i"] = acc_t2i / pairs
        return output

    # -- batches --------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        shuffle = self.args.train_sampling_strategy != "sequential"
        return self._global_batches(dataset, self._train_batch_size, shuffle, "training")

    def _get_eval_sampler(self, eval_dataset):
        return self._global_batches(eval_dataset, self.args.eval_batch_size, False, "evaluation")

    def _global_batches(self, dataset, per_rank: int, shuffle: bool, what: str):
        args = self.args
        seed = args.seed if args.data_seed is None else args.data_seed
        self._batches = GlobalBatches(
            len(dataset),
            per_rank,
            max(args.world_size, 1),
            args.process_index,
            shuffle=shuffle,
            seed=seed,
            drop_last=args.dataloader_drop_last,
            what=what,
        )
        return self._batches

    def get_train_dataloader(self):
        return self._checked(self.train_dataset, super().get_train_dataloader)

    def get_eval_dataloader(self, eval_dataset=None):
        dataset = eval_dataset
        if dataset is None or isinstance(dataset, str):
            dataset = self.eval_dataset if dataset is None else self.eval_dataset[dataset]
        return self._checked(
            dataset, lambda: super(Trainer, self).get_eval_dataloader(eval_dataset)
        )

    def get_test_dataloader(self, test_dataset):
        return self._checked(
            test_dataset, lambda: super(Trainer, self).get_test_dataloader(test_dataset)
        )

    def _checked(self, dataset, make):
        """The dataloader ``make()`` builds, checked to hold the global batches unsharded."""
        if isinstance(dataset, IterableDataset) and self.args.world_size > 1:
            if not self.args.dataloader_drop_last:
                raise ValueError(
                    "palmtree.compat.transformers.Trainer: an IterableDataset on several ranks "
                    "needs dataloader_drop_last=True: accelerate pads its last batch with "
                    "repeated samples, which would join the global batch as extra pairs"
                )
        self._batches = None
        dataloader = make()
        return unsharded(dataloader, self._batches)


class _Embeddings(nn.Module):
    """The wrapped model as :func:`palmtree.accumulate`'s ``encode``: ``(image_embeds,
    text_embeds)`` of one micro-batch, through the wrapper's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: dict):
        outputs = self.model(**_model_inputs(inputs), return_loss=False)
        return outputs.image_embeds, outputs.text_embeds


def _model_inputs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k not in _OWN_INPUTS}


def _options(kind: str, given: dict) -> LossOptions:
    """palmtree's options for ``kind`` (SigLIP: no cap, unless given), checked."""
    base = NO_CAP if kind == "siglip" else {}
    try:
        return LossOptions(**{**base, **given}).validated()
    except TypeError as exc:
        raise TypeError(f"loss_options: {exc}") from None


def _setup_problem(trainer: transformers.Trainer) -> str | None:
    """What this ``Trainer`` cannot do exactly with these arguments (``None``: nothing)."""
    args = trainer.args
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled or trainer.is_fsdp_xla_enabled:
        return (
            "FSDP and DeepSpeed are not supported (the loss reads logit_scale outside the "
            "sharded forward); use DDP, or palmtree's loss inside your own FSDP loop"
        )
    if trainer.compute_loss_func is not None:
        return "compute_loss_func is not used: this Trainer computes palmtree's loss itself"
    if trainer.compute_metrics is not None:
        return (
            "compute_metrics is not supported: evaluation returns no predictions (a "
            "contrastive batch's logits are per batch); it reports eval_loss, eval_acc_i2t "
            "and eval_acc_t2i over the global batches"
        )
    if args.gradient_accumulation_steps > 1 and trainer.accelerator.scaler is not None:
        return (
            "fp16 loss scaling with gradient_accumulation_steps > 1 is not supported: use "
            "bf16=True, or gradient_accumulation_steps=1 with a larger batch per device"
        )
    return None
