"""The loss under ``torch.compile``: the checks that need a tensor's values, without a host sync.

Eager calls read the values they check (non-finite features, a log-scale whose ``exp``
overflows, mask values) in one host sync and raise :class:`~palmtree.ClipLossInputError`
with the problem named. A compiled graph cannot branch on a value: there each such
check is an assertion in the graph (``torch._assert_async``) that raises a ``RuntimeError``
with the same words when it fails, and costs no sync where the device runs asynchronously
(on a GPU a failed assertion is a device-side assert: the process cannot go on). Checks
of shapes, dtypes and options need no value and run as in eager mode, while the graph is
traced. docs/design.md §9 says what a compiled caller gives up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .scale import FP32_MAX, LOG_SCALE_LIMIT, OVERFLOWS, largest_loss_sum, log_scale_reason


def compiling() -> bool:
    """Whether this code is being traced by ``torch.compile`` (dynamo)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def require(condition: torch.Tensor, message: str) -> None:
    """Raises ``RuntimeError(message)`` where the 0-dim bool ``condition`` is False."""
    torch._assert_async(condition, message)


#: The value checks of a compiled call, in the order every rank packs them into the
#: exchange (:func:`palmtree.distributed.exchange_layout`): ``{message: bad}`` findings,
#: ``bad`` a 0-dim bool tensor, one fixed slot each whatever a rank found.
NON_FINITE = "non-finite values (nan or inf) in {}"
MASK_NOT_BINARY = "text_mask must hold only 0 and 1 (or be bool)"
MASK_EMPTY_ROW = "text_mask has no real token in some row(s)"
VALUE_CHECKS = (
    MASK_NOT_BINARY,
    MASK_EMPTY_ROW,  # first: a row with no token pools to 0/0, non-finite text
    *(NON_FINITE.format(name) for name in ("image_features", "text_features")),
    *(NON_FINITE.format(name) for name in ("logit_scale", "logit_bias")),
)


@dataclass
class GraphChecks:
    """What a compiled call checks while it runs: the float64 scale and bias (``[2]``,
    compared across ranks bit for bit) and the value checks' ``{message: bad}``."""

    values: torch.Tensor | None = None
    findings: dict[str, torch.Tensor] = field(default_factory=dict)

    def packed(self, device) -> torch.Tensor:
        """``[len(VALUE_CHECKS) + 2]`` int64: the checks' flags (1: found), then the
        value's bits."""
        unknown = set(self.findings) - set(VALUE_CHECKS)
        assert not unknown, f"unknown value checks {unknown}"
        zero = torch.zeros((), dtype=torch.bool, device=device)
        flags = [self.findings.get(message, zero).to(device) for message in VALUE_CHECKS]
        values = torch.zeros(2, device=device) if self.values is None else self.values
        bits = values.to(device).double().view(torch.int64)
        return torch.cat([torch.stack(flags).long(), bits])

    def require_here(self) -> None:
        """One process: each finding as an assertion, in :data:`VALUE_CHECKS`' order."""
        for message in VALUE_CHECKS:
            if message in self.findings:
                require(~self.findings[message], message)


def finite_findings(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{message: bad}``: a NaN or inf in each named tensor."""
    return {NON_FINITE.format(name): ~torch.isfinite(x).all() for name, x in named.items()}


def require_usable_scale(loss, theta, bias, cap: float, mode: str, B) -> None:
    """The compiled form of :func:`~palmtree.scale.log_scale_problem` and
    :func:`~palmtree.scale.loss_range_problem`: the same rules and words, as assertions."""
    reason = log_scale_reason(cap, mode)
    if reason is not None:
        require(~(theta > LOG_SCALE_LIMIT), f"logit_scale above {LOG_SCALE_LIMIT}: {reason}")
    scale = torch.clamp(theta.double(), max=LOG_SCALE_LIMIT).exp().clamp(max=cap)
    batch = torch.full((), B, dtype=torch.float64, device=scale.device)
    largest = largest_loss_sum(loss, scale, bias.double(), batch, log=torch.log)
    require(~(largest >= FP32_MAX), f"the scale (and bias) at this global batch {OVERFLOWS}")
