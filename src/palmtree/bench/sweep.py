"""The sweep: every (D, B, implementation, precision) case of one loss, ``rounds`` times,
interleaved.

Cases that cannot run here become ``skip`` results with the reason; once an
implementation runs out of memory at some ``B``, its larger ``B`` (same precision and
``D``) are ``oom`` without being run. Rounds pool each case's timed runs
(:func:`combine_rounds`), so that load on a shared machine hits every case alike. Each
case's result is handed over as soon as its last round ends (:func:`run_sweep`), so that
the command line writes it before the next case starts.
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .cases import SIGLIP_BIAS, Case, impl_label, skip_reason
from .check import OUTSIDE, Oracles
from .compiled import compile_note
from .measure import one_line, run_case, run_case_in_process, timing
from .report import percent
from .targets import NO_TARGETS, TargetSpec

#: A case of the plan: ``(dim, batch, impl, precision)``.
Key = tuple[int, int, str, str]


@dataclass(frozen=True)
class Sweep:
    """What to run, resolved from the command line and the device's defaults."""

    device: torch.device
    batch_sizes: list[int]
    dims: list[int]
    impls: list[str]
    precisions: list[str]
    repeats: int
    warmup: int
    rounds: int
    seed: int
    log_scale: float
    isolate: str  # "process" or "none"
    check_precision: str | None  # whose fp32 bounds are computed; None: no float64 check
    chunk_size: int | None = None
    mem_limit_mb: int | None = None
    threads: int | None = None
    case_timeout: float | None = None
    loss: str = "clip"  # one of palmtree.options.LOSSES
    logit_bias: float = SIGLIP_BIAS  # siglip only
    targets: TargetSpec = NO_TARGETS  # every case's labels and extra negatives

    def plan(self) -> list[Key]:
        """Every case, in the order run: by ``D``, then ``B``, then implementation."""
        return [
            (dim, batch, impl, precision)
            for dim in self.dims
            for batch in sorted(self.batch_sizes)
            for impl in self.impls
            for precision in self.precisions
        ]

    def case(self, key: Key, oracle_file: str | None) -> Case:
        dim, batch, impl, precision = key
        return Case(
            impl=impl,
            precision=precision,
            batch=batch,
            dim=dim,
            device=self.device.type,
            repeats=self.repeats,
            warmup=self.warmup,
            seed=self.seed,
            log_scale=self.log_scale,
            chunk_size=self.chunk_size,
            oracle=oracle_file,
            mem_limit_mb=self.mem_limit_mb,
            threads=self.threads,
            loss=self.loss,
            logit_bias=self.logit_bias,
            labels=self.targets.labels,
            same_label=self.targets.same_label,
            negatives=self.targets.negatives,
        )


def run_sweep(sweep: Sweep) -> Iterator[tuple[Key, dict]]:
    """Runs every case of the plan ``sweep.rounds`` times; yields each case's combined
    result as soon as its last round has run, so that the caller can keep it at once.

    Interrupted (``KeyboardInterrupt``), it first yields what the cases not yet yielded
    measured in the rounds that did finish (a note says how many), then re-raises.
    """
    plan = sweep.plan()
    results: dict[Key, list[dict]] = {key: [] for key in plan}
    oomed: dict[tuple[str, str, int], int] = {}  # (impl, precision, dim) -> first OOM batch
    done: set[Key] = set()
    with tempfile.TemporaryDirectory(prefix="palmtree-bench-") as tmp:
        oracles = _oracles(sweep, Path(tmp) if sweep.isolate == "process" else None)
        try:
            for round_ in range(sweep.rounds):
                for key in plan:
                    dim, batch, impl, precision = key
                    oracle, oracle_file = oracles.get(batch, dim)
                    case = sweep.case(key, oracle_file)
                    result = _run_one(case, sweep, oracle, oomed)
                    if result["status"] == "oom":
                        oomed.setdefault((impl, precision, dim), batch)
                    results[key].append(result)
                    prefix = f"[{round_ + 1}/{sweep.rounds}] " if sweep.rounds > 1 else ""
                    print_case(prefix, case, result)
                    if round_ == sweep.rounds - 1:
                        done.add(key)
                        yield key, combine_rounds(results[key])
        except KeyboardInterrupt:
            for key in plan:
                if key not in done and results[key]:
                    yield key, _interrupted(results[key], sweep.rounds)
            raise


def _oracles(sweep: Sweep, files: Path | None) -> Oracles:
    return Oracles(
        sweep.device,
        sweep.seed,
        sweep.log_scale,
        sweep.check_precision,
        files,
        sweep.loss,
        sweep.logit_bias,
        sweep.targets,
    )


def _interrupted(results: list[dict], rounds: int) -> dict:
    row = combine_rounds(results)
    note = f"interrupted: {len(results)} of {rounds} rounds ran"
    row["note"] = "; ".join(n for n in (row.get("note", ""), note) if n)
    return row


def _run_one(case: Case, sweep: Sweep, oracle: dict | None, oomed: dict) -> dict:
    why = skip_reason(case.impl, case.precision, sweep.device, case.loss, case.targets)
    if why is not None:
        return dict(status="skip", note=why)
    smaller = oomed.get((case.impl, case.precision, case.dim))
    if smaller is not None and case.batch > smaller:
        return dict(status="oom", note=f"not run: out of memory at B={smaller} already")
    if sweep.isolate == "process":
        return run_case_in_process(case, sweep.case_timeout)
    try:
        return run_case(case, oracle)
    except Exception as exc:
        return dict(status="error", note=one_line(exc))
    finally:
        gc.collect()
        if sweep.device.type == "cuda":
            torch.cuda.empty_cache()


def combine_rounds(results: list[dict]) -> dict:
    """One row from a case's rounds: timed runs pooled (median, min, quartiles), worst memory
    and error.

    The note is the bounds' verdict of a round that fell outside them if any did (else of
    the first), then each round's compile time (``chunked+compile``), then how many rounds
    failed.
    """
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        return dict(results[0], repeats=0)
    times = [t for r in ok for t in r["times"]]
    out = dict(ok[0])
    out.update(timing(times), repeats=len(times), peak_mb=max(r["peak_mb"] for r in ok))
    for k in ("loss_diff", "grad_diff"):
        values = [r[k] for r in ok if r.get(k) is not None]
        out[k] = max(values) if values else None
    notes = [r.get("note", "") for r in ok]
    notes = [next((n for n in notes if n.startswith(OUTSIDE)), notes[0]), compile_note(ok)]
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        first = f"{failed[0]['status']}: {failed[0].get('note', '')}"
        notes.append(f"{len(failed)} of {len(results)} rounds failed, first: {first}")
    out["note"] = "; ".join(n for n in notes if n)
    return out


def print_case(prefix: str, case: Case, row: dict) -> None:
    """One line per case as it finishes."""
    impl = impl_label(case.impl, case.loss, case.targets)
    what = f"{prefix}{impl:>16} {case.precision:<5} B={case.batch:<7} D={case.dim:<5}"
    if row["status"] != "ok":
        print(f"{what} {row['status']}: {row.get('note', '')}", flush=True)
        return
    diff = ""
    if row.get("loss_diff") is not None:
        diff = f", loss diff {row['loss_diff']:.1e}, grad diff {row['grad_diff']:.1e}"
    if row.get("note"):
        diff += f"; {row['note']}"
    ms, mb, loss = row["median_ms"], row["peak_mb"], row["loss"]
    spread = "" if row.get("spread") is None else f" IQR {percent(row['spread'])}"
    print(f"{what} {ms:10.2f} ms{spread:>10} {mb:10.1f} MB  loss {loss:.4f}{diff}", flush=True)
