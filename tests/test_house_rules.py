"""The shape rules of the code (issue 20): small rooms, short functions, one import style.

Read from the source with :mod:`ast`, nothing imported or run. Rooms (the ``.py`` files of
``src/``, ``benchmarks/`` and ``examples/``) stay under 300 lines, except the Triton
kernel files (a file that defines a ``@triton.jit`` function). Functions stay within 60
lines (from ``def`` to their last line), except the kernels themselves and argparse
builders (functions most of whose statements add arguments). Inside ``src/palmtree`` the
package imports itself relatively only: ``from .. import clip_loss``, never
``from palmtree ...`` or ``import palmtree``, at module level or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "palmtree"
ROOMS = sorted(p for top in ("src", "benchmarks", "examples") for p in (ROOT / top).rglob("*.py"))
MAX_ROOM_LINES = 300
MAX_FUNCTION_LINES = 60


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _is_kernel(node: ast.AST) -> bool:
    """A function decorated ``@triton.jit`` (or ``@jit``, ``@triton.jit(...)``)."""
    for decorator in getattr(node, "decorator_list", []):
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "jit":
            return True
    return False


def _is_argparse_builder(node: ast.FunctionDef) -> bool:
    """Most of the function's statements are ``<parser or group>.add_argument(...)``."""

    def adds_argument(statement: ast.stmt) -> bool:
        call = getattr(statement, "value", None)
        return (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and call.func.attr == "add_argument"
        )

    return sum(map(adds_argument, node.body)) * 2 > len(node.body)


def _functions(tree: ast.Module):
    return (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))


def test_rooms_are_under_300_lines_outside_kernel_files():
    assert ROOMS, "found no source files"
    too_big = []
    for path in ROOMS:
        lines = len(path.read_text().splitlines())
        if lines >= MAX_ROOM_LINES and not any(map(_is_kernel, _functions(_tree(path)))):
            too_big.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not too_big, "rooms of 300 lines or more (split them):\n" + "\n".join(too_big)


def test_functions_are_at_most_60_lines_outside_kernels_and_parsers():
    too_long = []
    for path in ROOMS:
        for node in _functions(_tree(path)):
            length = node.end_lineno - node.lineno + 1
            exempt = _is_kernel(node) or _is_argparse_builder(node)
            if length > MAX_FUNCTION_LINES and not exempt:
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length}")
    assert not too_long, "functions over 60 lines (split them):\n" + "\n".join(too_long)


def test_the_package_imports_itself_relatively():
    absolute = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if any(name == "palmtree" or name.startswith("palmtree.") for name in names):
                absolute.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not absolute, "absolute palmtree imports inside the package:\n" + "\n".join(absolute)
