"""Other implementations of the CLIP and SigLIP losses, loaded for comparison (benchmarks
and tests).

``open_clip`` (package ``open-clip-torch``): its ``ClipLoss`` and ``SigLipLoss`` live in
``open_clip/loss.py``,
which needs only torch. The package's ``__init__`` imports the whole model zoo
(torchvision, timm, ...), which may not import at all beside a CPU-only torch, so
:func:`load_open_clip_loss_module` executes that one file, unchanged, as a standalone
module without running ``open_clip/__init__.py``.

``inf_cl`` (package ``inf-cl``): ``inf_cl.cal_inf_loss``, Triton kernels, CUDA only; it
has no sigmoid loss.

Nothing here is imported by ``import palmtree``. Each loader raises
:class:`PeerUnavailable` with the reason when the peer cannot run here;
:func:`peer_status` returns that reason instead of raising.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

PEERS = ("open_clip", "inf_cl")
_DISTRIBUTIONS = {"open_clip": "open-clip-torch", "inf_cl": "inf-cl"}
#: Head widths Inf-CL's kernels accept; the feature dim is split into heads of one of them.
_INF_CL_HEAD_DIMS = (256, 128, 64, 32, 16)


class PeerUnavailable(RuntimeError):
    """A peer implementation is not installed or cannot run on this machine."""


def peer_version(name: str) -> str | None:
    """The installed distribution's version, or ``None`` when it is not installed."""
    try:
        return importlib.metadata.version(_DISTRIBUTIONS[name])
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def load_open_clip_loss_module() -> ModuleType:
    """open_clip's own ``loss.py`` as a module (``ClipLoss``, ``SigLipLoss``, ...).

    Returns ``open_clip.loss`` itself when the package has already been imported;
    otherwise the file is found through the import system (``find_spec`` on a
    top-level package does not execute it) and executed on its own. ``loss.py`` has
    no relative imports, so it runs exactly as it does inside the package.

    Raises:
        PeerUnavailable: open-clip-torch is not installed or has no ``loss.py``.
    """
    if "open_clip.loss" in sys.modules:
        return sys.modules["open_clip.loss"]
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise PeerUnavailable(
            "open_clip is not installed (pip install open-clip-torch; its dependencies "
            "are not needed for the loss)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "loss.py"
        if path.is_file():
            break
    else:
        raise PeerUnavailable(
            f"open_clip is installed at {list(spec.submodule_search_locations)} but has no loss.py"
        )
    loss_spec = importlib.util.spec_from_file_location("_palmtree_peer_open_clip_loss", path)
    module = importlib.util.module_from_spec(loss_spec)
    try:
        loss_spec.loader.exec_module(module)
    except Exception as exc:  # an incompatible future version: say which file failed
        raise PeerUnavailable(f"open_clip's {path} does not import on its own: {exc}") from exc
    if not hasattr(module, "ClipLoss"):
        raise PeerUnavailable(f"open_clip's {path} defines no ClipLoss")
    return module


def open_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """open_clip's ``ClipLoss`` on one process, called the way open_clip's training does.

    ``logit_scale`` is the *log* temperature (as :func:`palmtree.clip_loss` takes it);
    open_clip's loss receives ``exp(logit_scale)`` and unit features (its models
    normalise them). With one process ``local_loss`` and ``gather_with_grad`` change
    nothing; they are set as a correct multi-GPU run would set them. Unlike palmtree,
    open_clip does not cap the temperature inside the loss (its training loop clamps
    the parameter), so compare below the cap.
    """
    module = load_open_clip_loss_module()
    if normalize:
        image_features = F.normalize(image_features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
    loss_fn = module.ClipLoss(local_loss=True, gather_with_grad=True)
    return loss_fn(image_features, text_features, logit_scale.exp())


def open_clip_siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """open_clip's ``SigLipLoss`` on one process (``world_size=1``), as its training calls it.

    ``logit_scale`` is the *log* temperature (as :func:`palmtree.siglip_loss` takes it);
    open_clip's loss receives ``exp(logit_scale)``, the bias as it is, and unit features.
    Its value is ``palmtree.siglip_loss``'s ``L``: the sum over the ``B x B`` pairs of
    ``-log sigmoid(z * logit)``, divided by ``B``.

    Raises:
        PeerUnavailable: the installed ``loss.py`` has no ``SigLipLoss``.
    """
    module = load_open_clip_loss_module()
    if not hasattr(module, "SigLipLoss"):
        raise PeerUnavailable("open_clip's loss.py defines no SigLipLoss")
    if normalize:
        image_features = F.normalize(image_features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
    loss_fn = module.SigLipLoss(rank=0, world_size=1)
    return loss_fn(image_features, text_features, logit_scale.exp(), logit_bias)


@functools.cache
def load_inf_cl() -> ModuleType:
    """The ``inf_cl`` package (Inf-CL's Triton kernels).

    Raises:
        PeerUnavailable: not installed, or it fails to import (it needs Triton and CUDA).
    """
    if importlib.util.find_spec("inf_cl") is None:
        raise PeerUnavailable("inf_cl is not installed (pip install inf-cl; CUDA only)")
    try:
        module = importlib.import_module("inf_cl")
    except Exception as exc:
        raise PeerUnavailable(f"inf_cl is installed but does not import: {exc}") from exc
    if not hasattr(module, "cal_inf_loss"):
        raise PeerUnavailable("inf_cl has no cal_inf_loss")
    return module


def inf_cl_head_dim(dim: int) -> int:
    """The widest head Inf-CL accepts that divides ``dim`` (its kernels split D into heads)."""
    for head in _INF_CL_HEAD_DIMS:
        if dim % head == 0:
            return head
    raise PeerUnavailable(f"Inf-CL needs a feature dim divisible by 16, got {dim}")


@contextlib.contextmanager
def single_rank_group(device: torch.device):
    """A world-size-1 process group for the duration, unless one is already initialised.

    Inf-CL's temperature gradient all-reduces unconditionally, so even one process needs
    a group. The group is destroyed on exit when this function created it.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def inf_cl_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """Inf-CL's bidirectional loss, as its README combines ``cal_inf_loss`` for CLIP.

    Call it inside :func:`single_rank_group` when no process group exists.
    """
    cal_inf_loss = load_inf_cl().cal_inf_loss
    if normalize:
        image_features = F.normalize(image_features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
    head_dim = inf_cl_head_dim(image_features.shape[-1])
    scale = logit_scale.exp()
    i2t = cal_inf_loss(image_features, text_features, scale=scale, head_dim=head_dim)
    t2i = cal_inf_loss(text_features, image_features, scale=scale, head_dim=head_dim)
    return (i2t + t2i) / 2


def peer_status(name: str, device: torch.device | str, loss: str = "clip") -> str | None:
    """``None`` when peer ``name`` can compute ``loss`` (``clip`` or ``siglip``) on
    ``device``, else why it cannot."""
    device = torch.device(device)
    if name not in PEERS:
        return f"unknown peer {name!r} (known: {', '.join(PEERS)})"
    if name == "inf_cl" and loss == "siglip":
        return "Inf-CL has no sigmoid loss"
    try:
        if name == "open_clip":
            module = load_open_clip_loss_module()
            if loss == "siglip" and not hasattr(module, "SigLipLoss"):
                return "open_clip's loss.py defines no SigLipLoss"
            return None
        if device.type != "cuda":
            return "inf_cl runs on CUDA only (Triton kernels)"
        if importlib.util.find_spec("inf_cl") is None:
            return "inf_cl is not installed (pip install inf-cl)"
        load_inf_cl()
        return None
    except PeerUnavailable as exc:
        return str(exc)
