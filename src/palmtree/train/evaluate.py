"""Held-out evaluation: zero-shot classification and cross-modal retrieval.

Embeddings go through the same path as in training: the tower, then the loss's
projection (when it has one), the masked mean over the text tokens, and L2
normalisation in fp32.

Captions describe a class, not one image, so many items are correct answers to a
query: a retrieved item counts as a hit when it shows or describes the same
``group`` (the same digit; for CSV data, the same caption text).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from .. import masked_mean_pool
from ..normalize import NORM_EPS
from .data import CaptionedImages
from .models import DualEncoder
from .tokenizer import pad_batch


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def embed_images(
    model: DualEncoder, images: torch.Tensor, device, amp_dtype=None, batch: int = 512
) -> torch.Tensor:
    """``[n, C, H, W]`` -> unit ``[n, E]`` fp32."""
    out = []
    for start in range(0, images.shape[0], batch):
        with _autocast(device, amp_dtype):
            x = model.image(images[start : start + batch].to(device))
        proj = model.loss_fn.image_proj
        x = x.float() if proj is None else proj(x.float())
        out.append(F.normalize(x, dim=-1, eps=NORM_EPS))
    return torch.cat(out) if out else torch.empty(0, model.loss_fn.embed_dim or 0)


@torch.no_grad()
def embed_texts(
    model: DualEncoder, captions: list[list[int]], device, amp_dtype=None, batch: int = 512
) -> torch.Tensor:
    """Token-id lists -> unit ``[n, E]`` fp32."""
    out = []
    for start in range(0, len(captions), batch):
        ids, mask = pad_batch(captions[start : start + batch])
        ids, mask = ids.to(device), mask.to(device)
        with _autocast(device, amp_dtype):
            latents = model.text(ids, mask)
        pooled = masked_mean_pool(latents.float(), mask)
        proj = model.loss_fn.text_proj
        pooled = pooled if proj is None else proj(pooled)
        out.append(F.normalize(pooled, dim=-1, eps=NORM_EPS))
    return torch.cat(out)


def recall_at_k(similarity: torch.Tensor, query_groups, item_groups, ks=(1, 5)) -> dict:
    """Fraction of queries (rows) with an item of their own group among the top k columns."""
    query_groups = torch.as_tensor(np.asarray(query_groups))
    item_groups = torch.as_tensor(np.asarray(item_groups))
    top = similarity.topk(min(max(ks), similarity.shape[1]), dim=1).indices
    hits = item_groups[top] == query_groups[:, None]
    return {k: float(hits[:, :k].any(dim=1).double().mean()) for k in ks}


def _all_images(dataset: CaptionedImages) -> torch.Tensor:
    if dataset.images is not None:
        return dataset.images
    return torch.stack([dataset.load_image(i) for i in range(len(dataset))])


@torch.no_grad()
def evaluate(
    model: DualEncoder,
    test: CaptionedImages,
    class_prompts: list[list[list[int]]] | None,
    device,
    amp_dtype=None,
) -> dict:
    """Metrics on the held-out split (``None`` where they do not apply)."""
    was_training = model.training
    model.eval()
    try:
        images = embed_images(model, _all_images(test), device, amp_dtype)
        texts = embed_texts(model, [c[0] for c in test.captions], device, amp_dtype)
        groups = test.groups
        i2t = recall_at_k(images @ texts.T, groups, groups)
        t2i = recall_at_k(texts @ images.T, groups, groups)
        result = {
            "zero_shot_top1": None,
            "image_to_text_r1": i2t[1],
            "image_to_text_r5": i2t[5],
            "text_to_image_r1": t2i[1],
            "text_to_image_r5": t2i[5],
            "test_size": len(test),
        }
        if class_prompts is not None:
            # Prompt ensemble: the mean of each class's unit prompt embeddings, renormalised.
            n_classes, n_prompts = len(class_prompts), len(class_prompts[0])
            flat = [ids for prompts in class_prompts for ids in prompts]
            prompts = embed_texts(model, flat, device, amp_dtype).view(n_classes, n_prompts, -1)
            classes = F.normalize(prompts.mean(dim=1), dim=-1)
            predicted = (images @ classes.T).argmax(dim=1).cpu().numpy()
            result["zero_shot_top1"] = float((predicted == np.asarray(groups)).mean())
        return result
    finally:
        model.train(was_training)
