"""palmtree: exact, memory-lean contrastive losses for PyTorch.

``clip_loss`` / ``ClipLoss`` (softmax) and ``siglip_loss`` / ``SigLipLoss`` (sigmoid)
give, on any number of ranks and any split of the global batch, the loss and gradients
of one process on the whole global batch.
"""

from .accumulate import accumulate
from .distributed import ClipLossInputError
from .loss import ClipLoss, ClipLossOutput, clip_loss
from .pooling import masked_mean_pool
from .scale import capped_scale
from .siglip import SigLipLoss, SigLipLossOutput, siglip_loss

__all__ = [
    "ClipLoss",
    "ClipLossInputError",
    "ClipLossOutput",
    "SigLipLoss",
    "SigLipLossOutput",
    "accumulate",
    "capped_scale",
    "clip_loss",
    "masked_mean_pool",
    "siglip_loss",
]
__version__ = "0.1.0"
