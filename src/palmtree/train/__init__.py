"""``palmtree train``: align a small image encoder and a small text encoder with a palmtree
loss (CLIP or SigLIP), on spawned CPU ranks or under torchrun.

Its dependencies (numpy, scikit-learn, matplotlib, tqdm, Pillow: the project's
``[train]`` extra) are imported only once the flags are parsed and found installed,
never by ``import palmtree``.
"""

from __future__ import annotations

import importlib.util
import sys
import time

#: Importable name -> package name, for what a run needs of the ``[train]`` extra.
EXTRA = {
    "numpy": "numpy",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "PIL": "pillow",
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``palmtree train``; returns the exit status."""
    t0 = time.time()
    from .options import parse_config

    try:
        cfg = parse_config(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse printed the usage and the error
        return exc.code if isinstance(exc.code, int) else 2
    missing = missing_packages(cfg)
    if missing:
        print(
            f"palmtree train: error: it needs the project's [train] extra, and "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
            "pip install '.[train]' (in the project's folder)",
            file=sys.stderr,
        )
        return 2
    from .launch import run

    return run(cfg, t0)


def missing_packages(cfg) -> list[str]:
    """The packages of the ``[train]`` extra that this run needs and cannot import."""
    needed = ["numpy", "matplotlib"]  # the data and the evaluation; curves.png
    needed += ["sklearn"] if cfg.train_data is None else ["PIL"]  # the digits; CSV images
    needed += ["tqdm"] if cfg.progress else []
    return [EXTRA[name] for name in needed if _find(name) is None]


def _find(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a broken install counts as missing
        return None


__all__ = ["main"]
