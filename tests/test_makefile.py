"""The Makefile's setup says what it is doing.

A fresh ``make demo`` or ``make test`` spends minutes in ``pip install -q`` (torch
first); it printed nothing meanwhile. The setup runs here with a stand-in Python whose
``venv`` makes a ``pip`` that only records its arguments, so nothing is installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/bin/sh
# python3 -m venv DIR: a DIR/bin with a python and a pip that print what they were asked.
[ "$1 $2" = "-m venv" ] || exit 3
mkdir -p "$3/bin"
printf '#!/bin/sh\\necho "pip $*"\\n' > "$3/bin/pip"
printf '#!/bin/sh\\necho "python $*"\\n' > "$3/bin/python"
chmod +x "$3/bin/pip" "$3/bin/python"
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_each_setup_step_says_what_it_does(tmp_path):
    python = tmp_path / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    venv = tmp_path / "venv"
    proc = subprocess.run(
        ["make", "--no-print-directory", "setup", f"VENV={venv}", f"PY={python}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    pips = [i for i, line in enumerate(lines) if line.startswith("pip ")]
    assert [lines[i] for i in pips] == [
        "pip install -q --upgrade pip",
        "pip install -q torch==2.13.0",
        "pip install -q -e .[dev]",
        "pip install -q --no-deps open-clip-torch==3.3.0 sentence-transformers==6.0.1",
    ]
    # Before each install, a line that names what comes: pip is quiet for minutes.
    assert lines[0] == f"setup: creating {venv} with {python}"
    for i, what in zip(pips, ("pip", "torch==2.13.0", ".[dev]", "open-clip-torch"), strict=True):
        assert lines[i - 1].startswith("setup: ") and what in lines[i - 1], lines[i - 1]
    assert lines[-1] == f"setup: done; {venv} is ready"
    assert (venv / ".installed").exists()
