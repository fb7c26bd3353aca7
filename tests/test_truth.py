"""``palmtree.testing`` itself: its names, its layering, and its one rule for targets.

The float64 truth is what every other test trusts, so it must not lean on what it checks
(it imports nothing of palmtree but ``palmtree.precision`` and the eps of
``palmtree.normalize``), its older names must keep working for callers written against
them, and the place that says where each row's targets lie must be the only one: every
pass of both truths asks it.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from palmtree import testing
from palmtree.testing import problem, targets

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "palmtree" / "testing"

#: Every public name of the package before it was split by concern.
OLD_NAMES = [
    "KINDS", "OPERAND_UNIT", "UNDERFLOW", "UNIT_ROUNDOFF", "Reference", "SigLipReference",
    "check_scalar", "check_tensor", "gamma", "make_pairs", "max_error", "plain_fp32",
    "plain_fp32_siglip", "reference", "siglip_reference", "tensor_bound", "worst_of_orders",
]  # fmt: skip


def test_the_older_names_are_the_truths():
    assert testing.reference is testing.clip_truth
    assert testing.Reference is testing.ClipTruth
    assert testing.siglip_reference is testing.siglip_truth
    assert testing.SigLipReference is testing.SigLipTruth
    assert set(OLD_NAMES) < set(testing.__all__)
    assert all(hasattr(testing, name) for name in testing.__all__)


def _palmtree_imports(path: Path) -> set[str]:
    """The palmtree modules a file of the package imports, relative imports resolved."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = ["palmtree", "testing"][: 3 - node.level]
            names.add(".".join([*base, *filter(None, [node.module])]))
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module)
    return {name for name in names if name.split(".")[0] == "palmtree"}


def test_the_truth_imports_nothing_it_checks():
    """Only its own modules, ``palmtree.precision`` and ``palmtree.normalize``: a truth
    built on the losses' modules would share their defects."""
    files = sorted(PACKAGE.glob("*.py"))
    assert len(files) > 5
    for path in files:
        outside = {m for m in _palmtree_imports(path) if not m.startswith("palmtree.testing")}
        assert outside <= {"palmtree.precision", "palmtree.normalize"}, (path.name, outside)
    # The scan does see an import from outside the package where there is one.
    assert _palmtree_imports(PACKAGE / "plain.py") >= {"palmtree.precision"}


B, SIZES, WEIGHTS = 12, [5, 7], [1.0, -0.5]
#: An involution that keeps every pair on its rank: each swapped pair is the other's
#: target, and (as pairs with equal labels would be) the targets are symmetric.
SWAP = torch.tensor([1, 0, 3, 2, 4, 6, 5, 8, 7, 10, 9, 11])


def _swapped_targets(i0: int, i1: int, device=None) -> targets.Targets:
    rows = torch.arange(i1 - i0, device=device)
    return targets.Targets(rows, SWAP.to(device)[i0 + rows])


def _fields(truth) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v).double() for k, v in dataclasses.asdict(truth).items()}


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("precision", ["ieee", "bf16"])
def test_every_pass_takes_its_targets_from_one_place(monkeypatch, loss, precision):
    """Targets moved to ``SWAP`` give, field for field, the truth of the texts reordered
    by ``SWAP`` with the diagonal's targets: so no pass assumes the diagonal itself."""
    img, txt = testing.make_pairs(B, 6, seed=4)
    kw = dict(sizes=SIZES, weights=WEIGHTS, precision=precision, block=5)
    if loss == "clip":
        truth = lambda t: testing.clip_truth(img, t, 2.3, **kw)  # noqa: E731
    else:
        truth = lambda t: testing.siglip_truth(img, t, 2.3, -4.0, **kw)  # noqa: E731
    want = _fields(truth(txt[SWAP]))
    want["d_txt"] = want["d_txt"][SWAP]
    monkeypatch.setattr(problem, "block_targets", _swapped_targets)
    got = _fields(truth(txt))
    # Two float64 formations of the same sums, their columns in other orders: each rounds
    # sums of B = 12 terms of logits up to the scale (10), so they agree to 10 * 12 units
    # of float64's rounding (2**-53) of each value's largest entry.
    tol = math.exp(2.3) * B * 2.0**-53
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert testing.max_error(got[name], value) <= tol * float(value.abs().max()), name
