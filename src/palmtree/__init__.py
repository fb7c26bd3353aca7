"""palmtree: the exact, memory-lean contrastive (CLIP) loss for PyTorch.

``clip_loss`` / ``ClipLoss`` give, on any number of ranks and any split of the
global batch, the loss and gradients of one process on the whole global batch.
"""

from .distributed import ClipLossInputError
from .loss import ClipLoss, ClipLossOutput, clip_loss
from .pooling import masked_mean_pool
from .scale import capped_scale

__all__ = [
    "ClipLoss",
    "ClipLossInputError",
    "ClipLossOutput",
    "capped_scale",
    "clip_loss",
    "masked_mean_pool",
]
__version__ = "0.1.0"
