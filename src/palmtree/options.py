"""The losses' options: one frozen record, each field documented once, on every entry point.

:class:`LossOptions` holds how a loss is computed; every field carries its documentation.
:func:`takes_options` gives an entry point (``clip_loss``, ``siglip_loss``, the modules'
constructors, the drop-ins) the fields as keyword-only arguments: its signature and its
docstring show them with that entry point's defaults, and its body receives one checked
record. A new option is one field here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
import textwrap
from dataclasses import dataclass, field

from .backends import backend_name_problem
from .distributed import LOCAL
from .precision import precision_problem
from .scale import scale_cap_problem
from .targets import SAME_LABEL

#: The losses, everywhere (``palmtree train --loss``, ``bench --loss``, ``verify --losses``).
LOSSES = ("clip", "siglip")


def _option(default, doc: str):
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class LossOptions:
    """How the loss is computed (each field's ``metadata["doc"]`` says what it does)."""

    group: object = _option(
        None,
        "process group whose ranks share negatives (default: the default group; no process "
        "group at all means one rank).",
    )
    backend: str = _option(
        "auto",
        '``"auto"`` (``chunked``; ``fused`` only on CUDA cards where it has been measured, '
        'see ``palmtree.backends.FUSED_BY_DEFAULT``), ``"reference"``, ``"chunked"`` or '
        '``"fused"``. All give the same loss and gradients.',
    )
    precision: str | None = _option(
        None,
        'matmul operand precision ``"ieee" | "tf32" | "bf16"``; ``None`` follows '
        "``torch.get_float32_matmul_precision()``. Statistics and accumulators are fp32 "
        "in every mode.",
    )
    chunk_size: int | None = _option(
        None, "columns per chunk for ``chunked`` (``None``: from a memory budget)."
    )
    logit_scale_max: float = _option(
        100.0,
        "the temperature cap: the scale is ``min(exp(logit_scale), logit_scale_max)``, "
        "``inf`` for none. A log-scale whose ``exp`` overflows fp32 (above 88.72) is "
        "refused unless the cap holds it.",
    )
    scale_cap: str = _option(
        "clamp", '``"clamp"`` or ``"straight_through"``; see :func:`palmtree.capped_scale`.'
    )
    normalize: bool = _option(
        True,
        "L2-normalise the features (fp32, eps ``palmtree.normalize.NORM_EPS``). ``False`` "
        "takes them as given, as open_clip's loss does.",
    )
    same_label: str = _option(
        "positive",
        'what pairs with equal ``labels`` are to each other: ``"positive"`` (each other\'s '
        'targets) or ``"ignore"`` (left out of the loss; the diagonal stays the only '
        "positive). Without ``labels`` every pair is its own item and this does nothing.",
    )
    check_finite: bool = _option(True, "reject NaN/inf features (costs one host sync).")
    distributed: bool = _option(
        True,
        "``False`` computes the loss on this process's tensors alone, with no collective, "
        "even while a process group is up (an evaluation on one rank); ``group`` is then "
        "ignored.",
    )

    @property
    def exchange_group(self):
        """The group the loss exchanges with: ``group``, or :data:`~palmtree.distributed.LOCAL`
        (this process alone, no collective) when ``distributed`` is ``False``."""
        return self.group if self.distributed else LOCAL

    def problem(self) -> str | None:
        """What is wrong with the option values themselves (``None`` if nothing)."""
        problem = (
            backend_name_problem(self.backend)
            or precision_problem(self.precision)
            or scale_cap_problem(self.scale_cap)
            or _same_label_problem(self.same_label)
        )
        if problem is not None:
            return problem
        cap = self.logit_scale_max
        if not is_real(cap) or not cap > 0:  # also rejects nan
            return f"logit_scale_max must be a number > 0 (inf for no cap), got {cap!r}"
        size = self.chunk_size
        if size is not None and (not is_int(size) or size < 1):
            return f"chunk_size must be None or an integer >= 1, got {size!r}"
        for name in ("normalize", "check_finite", "distributed"):
            if not isinstance(getattr(self, name), bool):
                return f"{name} must be True or False, got {getattr(self, name)!r}"
        return None

    def validated(self) -> LossOptions:
        """``self``, or a ``ValueError`` (for constructors, which run on every rank alike)."""
        problem = self.problem()
        if problem is not None:
            raise ValueError(problem)
        return self


def _same_label_problem(value) -> str | None:
    if isinstance(value, str) and value in SAME_LABEL:
        return None
    return f"same_label must be one of {SAME_LABEL}, got {value!r}"


def is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def takes_options(*, only: tuple[str, ...] | None = None, **defaults):
    """Gives the decorated function the :class:`LossOptions` fields as keyword arguments.

    The function declares a keyword-only ``options`` parameter and receives the record
    there; callers pass the fields themselves (``backend="chunked"``). ``defaults`` are
    this entry point's own defaults (SigLIP: no cap); ``only`` limits the fields it takes,
    the others staying at ``defaults`` or the record's. Its signature and docstring show
    what it takes, with these defaults; an unknown keyword is a ``TypeError`` as Python's.
    """
    names = [f.name for f in dataclasses.fields(LossOptions)]
    taken = names if only is None else [n for n in names if n in only]

    def wrap(fn):
        own = inspect.signature(fn)
        base = {**{f.name: f.default for f in dataclasses.fields(LossOptions)}, **defaults}

        @functools.wraps(fn)
        def call(*args, **kwargs):
            given = {k: kwargs.pop(k) for k in taken if k in kwargs}
            if "options" in kwargs:
                raise TypeError(f"{fn.__name__}() got an unexpected keyword argument 'options'")
            return fn(*args, options=LossOptions(**{**base, **given}), **kwargs)

        params = [p for p in own.parameters.values() if p.name != "options"]
        kw = inspect.Parameter.KEYWORD_ONLY
        types = {f.name: f.type for f in dataclasses.fields(LossOptions)}
        params += [inspect.Parameter(n, kw, default=base[n], annotation=types[n]) for n in taken]
        call.__signature__ = own.replace(parameters=params)
        call.__doc__ = (fn.__doc__ or "").rstrip() + "\n\n" + options_doc(taken, base) + "\n"
        return call

    return wrap


def options_doc(names, defaults: dict) -> str:
    """The ``Options:`` section of an entry point's docstring."""
    docs = {f.name: f.metadata["doc"] for f in dataclasses.fields(LossOptions)}
    lines = ["    Options (keyword-only; the same on every palmtree loss):"]
    for name in names:
        text = f"{name} (default ``{defaults[name]!r}``): {docs[name]}"
        lines += textwrap.wrap(text, 88, initial_indent=" " * 8, subsequent_indent=" " * 12)
    return "\n".join(lines)
