"""The comparison rules: how close a result must be to the float64 truth.

Scalars against the truth's own bound (:func:`check_scalar`); gradient tensors against
twice the error of the plain fp32 computation (:func:`check_tensor`), the plain error
taken as the worst of a few summation orders (:func:`worst_of_orders`).
"""

from __future__ import annotations

import torch


def worst_of_orders(
    plain,
    img,
    txt,
    exact,
    orders: int = 4,
    seed: int = 123,
    feature_keys: tuple[str, ...] = ("d_img", "d_txt", "d_neg"),
    negatives: torch.Tensor | None = None,
) -> dict:
    """``plain(img, txt)`` over ``orders`` feature orders, each output the worst one.

    Permuting the feature dimension of both sides leaves the math unchanged and gives
    another, equally valid fp32 summation order. One order's error is a single sample;
    the worst of a few is what the plain computation can be relied on to achieve, which
    makes "within 2x plain" a rule that holds on every machine, not only a lucky one.
    ``exact`` maps output names to their float64 truth (e.g. ``vars(clip_truth(...))``);
    the outputs named in ``feature_keys`` are per-feature and permuted back. Extra
    ``negatives`` are permuted with the features and passed on as
    ``plain(img, txt, negatives=...)``, so they are not to be bound into ``plain``.
    """
    g = torch.Generator().manual_seed(seed)
    worst: dict = {}
    for k in range(orders):
        perm = torch.arange(img.shape[1]) if k == 0 else torch.randperm(img.shape[1], generator=g)
        perm = perm.to(img.device)
        extra = {} if negatives is None else {"negatives": negatives[:, perm]}
        out = plain(img[:, perm], txt[:, perm], **extra)
        inv = torch.argsort(perm)
        for name in feature_keys:
            if name in out:
                out[name] = out[name][:, inv]
        for name, value in out.items():
            if name not in exact:
                continue
            err = max_error(value, exact[name])
            if name not in worst or err > worst[name][0]:
                worst[name] = (err, value)
    return {name: value for name, (_, value) in worst.items()}


def max_error(ours: torch.Tensor, exact: torch.Tensor) -> float:
    """``max |ours - exact|`` in float64 (NaN if ``ours`` holds a NaN)."""
    diff = (torch.as_tensor(ours).detach().double().cpu() - exact.detach().double().cpu()).abs()
    if diff.numel() == 0:
        return 0.0
    return float("nan") if bool(diff.isnan().any()) else float(diff.max())


def check_scalar(name: str, ours, exact: torch.Tensor, bound: float) -> float:
    """Asserts ``|ours - exact| <= bound`` (NaN fails); returns the error."""
    err = max_error(torch.as_tensor(ours), exact)
    if not err <= bound:
        raise AssertionError(
            f"{name}: error {err:.3e} > bound {bound:.3e} (value {float(exact):.6g})"
        )
    return err


def tensor_bound(
    plain, exact: torch.Tensor, factor: float = 2.0, rel: float = 1e-6, size: float = 0.0
) -> float:
    """What a gradient tensor may be off by: ``factor * max|plain - exact| + rel * max|exact|``
    (NaN if ``plain`` holds a NaN, so nothing passes against it).

    Where the truth is exactly 0 everywhere, ``rel`` is of ``size`` instead: what the
    rounding is relative to there. A raw-feature gradient at ``D = 1`` is such a case
    (:class:`~palmtree.testing.ClipTruth`'s ``d_img_size``): the normalisation's
    projection removes all of it, every fp32 formation leaves up to 2 ulps of each row's
    gradient before the projection, and on which rows those land differs between
    formations, so the plain maximum alone is no stable measure.
    """
    scale = float(exact.detach().double().abs().max()) if exact.numel() else 0.0
    return factor * max_error(plain, exact) + rel * (scale if scale > 0 else size)


def check_tensor(
    name: str,
    ours,
    plain: torch.Tensor,
    exact: torch.Tensor,
    factor: float = 2.0,
    rel=1e-6,
    size: float = 0.0,
) -> float:
    """Asserts ``max|ours - exact| <= factor * max|plain - exact| + rel * max|exact|``, with
    ``size`` for ``max|exact|`` where the truth is exactly 0 (:func:`tensor_bound`)."""
    bound = tensor_bound(plain, exact, factor, rel, size)
    err = max_error(ours, exact)
    if not err <= bound:
        raise AssertionError(
            f"{name}: error {err:.3e} > bound {bound:.3e} "
            f"(plain fp32 {max_error(plain, exact):.3e})"
        )
    return err
