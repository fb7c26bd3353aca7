"""What every loss does before it computes: check, pool, agree across ranks.

:func:`prepare` runs the same steps for :func:`palmtree.clip_loss` and
:func:`palmtree.siglip_loss`: validate this rank's options and tensors, pool token
latents, reject non-finite values, then one exchange in which every rank learns the
batch layout and every rank's problems, and the ranks check that they agree on what
must match. A problem anywhere raises the same :class:`~palmtree.ClipLossInputError` on
every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .backends import backend_problem, resolve_backend
from .checks import DTYPES, agreed_fields, host_checks, input_problem, scale_problem
from .distributed import (
    Agreed,
    ClipLossInputError,
    Layout,
    check_membership,
    exchange_layout,
    world,
)
from .options import LossOptions
from .pooling import masked_mean_pool_fp32
from .precision import resolve_precision
from .scale import capped_scale, loss_range_problem
from .targets import SAME_LABEL, Targets, global_targets, labels_problem, negatives_problem
from .tracing import GraphChecks, compiling, finite_findings, require_usable_scale


@dataclass
class Call:
    """One rank's checked call: the layout, the (pooled) features, the fp32 capped scale,
    the fp32 bias (``None`` for CLIP), the backend and precision that run, the global
    :class:`~palmtree.targets.Targets` (``None``: the diagonal) and this rank's extra text
    columns (``None``: none)."""

    layout: Layout
    image: torch.Tensor
    text: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None
    backend: str
    precision: str
    device: torch.device
    targets: Targets | None = None
    negatives: torch.Tensor | None = None


@dataclass(frozen=True)
class Extras:
    """What a call may bring beyond the pairs: ``labels`` ``[b]`` and ``negatives``
    ``[n, D]`` (``text_negatives``), as the user passed them."""

    labels: object = None
    negatives: object = None


#: A call with neither.
NO_EXTRAS = Extras()


def prepare(
    loss: str,
    opts: LossOptions,
    image,
    text,
    logit_scale,
    text_mask=None,
    logit_bias=None,
    local_error: str | None = None,
    extras: Extras = NO_EXTRAS,
) -> Call:
    """Checks one rank's call of ``loss`` (``"clip"`` or ``"siglip"``) on every rank."""
    group = opts.exchange_group
    check_membership(group)
    device = _device_of(image, text)
    # Everything numeric is fp32 whatever autocast says (pooling included).
    with torch.autocast(device.type, enabled=False):
        args = (loss, opts, group, device, image, text, text_mask, logit_scale, logit_bias, extras)
        if compiling():  # a graph has no handler to turn an error into a message
            local = _check_locally(*args)
        else:
            try:
                local = _check_locally(*args)
            except Exception as exc:  # whatever it is, every rank must hear of it
                message = f"checking this rank's input failed: {type(exc).__name__}: {exc}"
                local = _Checked(message)
        error = local_error or local.error
        b_local = image.shape[0] if error is None else 0
        n_local = 0 if error is not None or extras.negatives is None else len(extras.negatives)
        agreed = agreed_fields(
            opts, loss, local.backend, local.precision, image, text, *local.values
        ) + _extras_agreed(opts, extras)
        layout = exchange_layout(b_local, agreed, device, error, group, local.graph_checks, n_local)
        if compiling():  # the same rules as assertions in the graph; the same values everywhere
            theta, cap, mode = local.logit_scale, opts.logit_scale_max, opts.scale_cap
            require_usable_scale(loss, theta, local.logit_bias, cap, mode, layout.b_global)
        else:  # the same values and B on every rank: the same verdict, no more exchange
            columns = layout.b_global + sum(layout.negative_sizes)  # the longest sums' terms
            overflow = loss_range_problem(loss, *local.values, opts.logit_scale_max, columns)
            if overflow is not None:
                raise ClipLossInputError(overflow)
        scale = capped_scale(local.logit_scale, opts.logit_scale_max, opts.scale_cap)
        bias = local.logit_bias.float() if loss == "siglip" else None
        targets = global_targets(extras.labels, layout, opts.same_label)
    negatives = extras.negatives
    return Call(
        layout,
        image,
        local.text,
        scale,
        bias,
        local.backend,
        local.precision,
        device,
        targets,
        negatives,
    )


def _extras_agreed(opts: LossOptions, extras: Extras) -> list[Agreed]:
    """Whether labels and negatives were given (a rank without negatives passes ``[0,
    D]``), and what same-item pairs are: the same on every rank."""
    return [
        Agreed.choice("labels given", extras.labels is not None, (False, True)),
        Agreed.choice("text_negatives given", extras.negatives is not None, (False, True)),
        Agreed.choice("same_label", opts.same_label, SAME_LABEL),
    ]


@dataclass
class _Checked:
    """What one rank's own checks found: a problem, or its ready inputs and the values
    (scale, bias) the ranks compare."""

    error: str | None
    backend: str | None = None
    precision: str | None = None
    text: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None
    logit_bias: torch.Tensor | None = None
    values: tuple[float, float] = (math.nan, math.nan)
    #: Under ``torch.compile``: the checks of values, which run in the graph.
    graph_checks: GraphChecks | None = None


def _check_locally(
    loss, opts, group, device, image, text, text_mask, logit_scale, logit_bias, extras
) -> _Checked:
    """This rank's checks, in order, then its pooled text and its 0-dim scale and bias."""
    error = (
        opts.problem()
        or input_problem(image, text, text_mask, logit_scale)
        or (_bias_problem(logit_bias, device) if loss == "siglip" else None)
        or labels_problem(extras.labels, image.shape[0], device)
        or negatives_problem(extras.negatives, image.shape[-1], device, DTYPES)
        or backend_problem(opts.backend, device)
    )
    if error is not None:
        return _Checked(error)
    # Any one-element tensor (HF's and FSDP2's [1]); its gradient keeps its own shape.
    logit_scale = _as_tensor(logit_scale, device).reshape(())
    logit_bias = _as_tensor(0.0 if logit_bias is None else logit_bias, device).reshape(())
    graph = None
    if compiling():  # checked in the graph, for every rank to see (palmtree.tracing)
        graph = GraphChecks(torch.stack([logit_scale.detach(), logit_bias.detach()]).double())
    if text.dim() == 3:
        try:
            text = masked_mean_pool_fp32(text, text_mask, None if graph is None else graph.findings)
        except ValueError as exc:
            return _Checked(str(exc))
    values = (math.nan, math.nan)
    if graph is not None:
        if opts.check_finite:
            named = dict(image_features=image, text_features=text, logit_scale=logit_scale)
            if extras.negatives is not None:
                named["text_negatives"] = extras.negatives
            graph.findings.update(finite_findings({**named, "logit_bias": logit_bias}))
    elif opts.check_finite or world(group)[1] > 1:
        # One host sync for both: the finite checks, and the values the ranks compare.
        error, values = host_checks(image, text, logit_scale, logit_bias, opts, extras.negatives)
    backend = resolve_backend(opts.backend, device)
    precision = resolve_precision(opts.precision)
    return _Checked(error, backend, precision, text, logit_scale, logit_bias, values, graph)


def _bias_problem(logit_bias, device) -> str | None:
    if logit_bias is None:
        return "logit_bias is required by the sigmoid loss (a tensor or a number)"
    problem = scale_problem(logit_bias, device)
    return problem.replace("logit_scale", "logit_bias") if problem else None


def _as_tensor(x, device: torch.device) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(float(x), device=device)


def _device_of(*tensors) -> torch.device:
    """The first real device among the tensors (CPU when there is none)."""
    for x in tensors:
        if isinstance(x, torch.Tensor) and not x.is_meta:
            return x.device
    return torch.device("cpu")
