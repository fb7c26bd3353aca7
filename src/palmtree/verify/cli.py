"""``palmtree verify``'s entry point: parse, choose the world, run the checks, report."""

from __future__ import annotations

import sys

from .options import Options, backend_problem, parse_args
from .report import render, to_json
from .spawn import Outcome


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 when every row passes, 1 on a failure, 2 on bad arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)

    import torch

    from ..distributed import launched_world
    from ..launch_utils import launched_rank

    me = launched_rank() if launched_world() else None
    problem = backend_problem(opts.backends, me.device if me else torch.device("cpu"))
    if problem:
        if me is None or me.rank == 0:
            print(f"palmtree verify: {problem}", file=sys.stderr)
        return 2
    if me is not None:
        rank, n, where, outcome = _run_launched(opts, me)
    else:
        rank, n, where, outcome = _run_spawned(opts)
    ok = outcome.error is None and bool(outcome.rows) and all(r["passed"] for r in outcome.rows)
    if rank == 0:
        _report(opts, n, where, outcome, ok)
    elif outcome.error:  # the other ranks only say why they failed
        print(f"palmtree verify: {outcome.error}", file=sys.stderr)
    return 0 if ok else 1


def _run_launched(opts: Options, me) -> tuple[int, int, str, Outcome]:
    """This rank of the world torchrun launched."""
    from .launched import check_in_launched_world

    if opts.nproc not in (None, me.world_size) and me.rank == 0:
        print(
            f"palmtree verify: --nproc ignored, torchrun launched {me.world_size} ranks",
            file=sys.stderr,
        )
    where = f"{me.backend}, {me.device}, launched"
    return me.rank, me.world_size, where, check_in_launched_world(opts, me)


def _run_spawned(opts: Options) -> tuple[int, int, str, Outcome]:
    """``--nproc`` local gloo ranks (2 by default), watched from this process."""
    from .spawn import spawn_and_check

    opts.nproc = opts.nproc or 2
    return 0, opts.nproc, "gloo, cpu, spawned", spawn_and_check(opts)


def _report(opts: Options, n: int, where: str, outcome: Outcome, ok: bool) -> None:
    """Rank 0's report: the table (or JSON) on stdout, what went wrong on stderr."""
    from .checks import split_sizes
    from .targets import describe, negative_sizes

    sizes = split_sizes(opts.batch, n)
    if opts.json:
        negatives = negative_sizes(opts.batch, n) if opts.targets else None
        print(to_json(ok, n, where, sizes, opts, outcome.rows, outcome.error, negatives))
        return
    header = (
        f"palmtree verify: {n} rank(s) ({where}), global batch {opts.batch} split "
        f"{sizes}, D={opts.dim}, seed {opts.seed}"
    )
    if opts.targets:
        header += describe(opts.batch, n)
    if outcome.rows:
        print(render(outcome.rows, header))
    if outcome.error:
        print(f"palmtree verify: {outcome.error}", file=sys.stderr)
