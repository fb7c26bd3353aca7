"""The fused backend's kernel launches, recorded instead of run: each reduced to a
:class:`Launch`, what the compiler sees (signature, constexprs, divisibility hints and
launch options), with no kernel named here."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import itertools
import json
import pkgutil
import warnings
from collections.abc import Iterator

from .targets import RECORD_ROWS, Target
from .toolchain import triton_api


@dataclasses.dataclass(frozen=True)
class Launch:
    """One recorded kernel launch, reduced to what the compiler sees."""

    label: str  # phase and place, e.g. "backward two_kernels #2"
    kernel: str
    module: str
    signature: dict  # parameter -> Triton type ("constexpr" for constexprs)
    constexprs: dict  # parameter -> value
    attrs: dict  # parameter index -> [["tt.divisibility", 16]]
    options: dict  # num_warps, num_stages as launched

    @property
    def flags(self) -> str:
        """The boolean constexprs that are set: what tells launches of one kernel apart."""
        return ",".join(k for k, v in self.constexprs.items() if v is True)

    def key(self) -> str:
        """Identifies the compiled code (not where it was launched from)."""
        spec = [self.module, self.kernel, self.signature, self.constexprs]
        return json.dumps(spec + [sorted(self.attrs), self.options], sort_keys=True, default=str)


def _triton_type(value) -> tuple[str, bool]:
    """``(Triton type, divisible by 16)`` of a runtime argument, as a launch sees it."""
    import torch

    if isinstance(value, torch.Tensor):
        names = {
            torch.float32: "fp32",
            torch.bfloat16: "bf16",
            torch.float16: "fp16",
            torch.float64: "fp64",
            torch.int64: "i64",
            torch.int32: "i32",
            torch.int8: "i8",
            torch.uint8: "u8",
            torch.bool: "i1",
        }
        if value.dtype not in names:
            raise TypeError(f"no Triton pointer type for {value.dtype}")
        return "*" + names[value.dtype], value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"no Triton type for argument {value!r}")


def _launch(label: str, fn, args: tuple, kwargs: dict) -> Launch:
    names = [p.name for p in fn.params]
    bound = inspect.signature(fn.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = bound.arguments[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        signature[param.name], divisible = _triton_type(value)
        if divisible:
            attrs[i] = [["tt.divisibility", 16]]
    options = {k: v for k, v in kwargs.items() if k not in names}
    return Launch(label, fn.fn.__name__, fn.fn.__module__, signature, constexprs, attrs, options)


class Recorder:
    """Launches recorded instead of run: ``(label, kernel, args, kwargs)``, the label
    ``"<phase> #<n>"`` for the n-th launch since :meth:`phase` last named the phase."""

    def __init__(self):
        self.launches: list[tuple] = []
        self._phase, self._count = "", 0

    def phase(self, name: str) -> None:
        self._phase, self._count = name, 0

    @contextlib.contextmanager
    def recording(self, jit_function) -> Iterator[None]:
        """For the duration, ``kernel[grid](...)`` records instead of compiling and running."""
        original = jit_function.run

        def record(kernel, *args, grid, warmup, **kwargs):
            self._count += 1
            self.launches.append((f"{self._phase} #{self._count}", kernel, args, kwargs))

        jit_function.run = record
        try:
            yield
        finally:
            jit_function.run = original


@contextlib.contextmanager
def fused_planned_for(target: Target, bwd_mode: str, overrides: dict | None) -> Iterator[None]:
    """For the duration, ``backend="fused"`` accepts CPU tensors and plans as on ``target``:
    ``TilePlan.for_problem`` returns :meth:`TilePlan.for_target` with ``bwd_mode`` (and
    ``overrides``, for the calibration)."""
    import palmtree.backends as backends
    from palmtree.backends import fused

    def for_problem(cls, dim, device, precision):
        plan = cls.for_target(dim, precision, target.capability, target.sm_count)
        return dataclasses.replace(plan, bwd_mode=bwd_mode, **(overrides or {}))

    saved = backends.fused_can_run, fused.TilePlan.__dict__["for_problem"]
    backends.fused_can_run = lambda device: True
    fused.TilePlan.for_problem = classmethod(for_problem)
    try:
        yield
    finally:
        backends.fused_can_run, fused.TilePlan.for_problem = saved


#: The calls' ``same_label``, by the tag their phases carry: no labels, then same-item
#: labels (three items) as positives and as ignored pairs, each a kernel variant.
_SAME_LABEL = {"": None, " labels=positive": "positive", " labels=ignore": "ignore"}


def record_launches(
    dim: int, precision: str, target: Target, overrides: dict | None = None
) -> list[Launch]:
    """The launches of one ``clip_loss`` and one ``siglip_loss`` (``backend="fused"``)
    forward and backward per ``bwd_mode``, without labels and with either kind
    (:data:`_SAME_LABEL`), labelled ``"<phase> #<n>"``: the n-th launch of
    the phase (``forward``, ``backward <bwd_mode>``, ``siglip forward``, ...); a launch
    repeated alike (a forward, once per mode) is kept once. The kernels do not run: their
    outputs stay uninitialised, and the host code between launches does not branch on them.
    """
    import torch

    from palmtree import clip_loss, siglip_loss
    from palmtree.backends import fused

    *_, jit_function = triton_api()
    gen = torch.Generator().manual_seed(dim)
    img = torch.randn(RECORD_ROWS, dim, generator=gen).requires_grad_()
    txt = torch.randn(RECORD_ROWS, dim, generator=gen).requires_grad_()
    log_scale = torch.tensor(2.66, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    kw = dict(backend="fused", precision=precision, check_finite=False)
    labels = torch.arange(RECORD_ROWS) % 3
    recorder = Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # arithmetic on uninitialised outputs
        for mode, (tag, same) in itertools.product(fused.BWD_MODES, _SAME_LABEL.items()):
            call = dict(kw) if same is None else dict(kw, labels=labels, same_label=same)
            with fused_planned_for(target, mode, overrides), recorder.recording(jit_function):
                recorder.phase(f"forward{tag}")
                loss = clip_loss(img, txt, log_scale, **call).loss
                recorder.phase(f"backward {mode}{tag}")
                loss.backward()
                recorder.phase(f"siglip forward{tag}")
                loss = siglip_loss(img, txt, log_scale, bias, **call).loss
                recorder.phase(f"siglip backward {mode}{tag}")
                loss.backward()
    out, seen = [], set()
    for label, fn, args, kwargs in recorder.launches:
        launch = _launch(label, fn, args, kwargs)
        if (label, launch.key()) not in seen:
            seen.add((label, launch.key()))
            out.append(launch)
    return out


def kernels_defined() -> list[str]:
    """``module.name`` of every ``@triton.jit`` kernel in ``palmtree.backends``: the jit
    functions that read ``tl.program_id``, as opposed to helpers the kernels call."""
    import palmtree.backends as backends

    *_, jit_function = triton_api()
    found = []
    for info in pkgutil.iter_modules(backends.__path__):
        module = importlib.import_module(f"{backends.__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, jit_function) and value.fn.__module__ == module.__name__:
                if "program_id" in inspect.getsource(value.fn):
                    found.append(f"{module.__name__}.{value.fn.__name__}")
    return sorted(found)
