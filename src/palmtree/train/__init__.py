"""``palmtree train``: align a small image encoder and a small text encoder with ClipLoss.

Heavy dependencies (scikit-learn, matplotlib, tqdm, Pillow) are imported here and
below only, never by ``import palmtree``.
"""

from .launch import main

__all__ = ["main"]
