"""``palmtree bench``: time and peak memory of the loss, per backend, precision and peer.

Every case is one forward+backward of the loss (the bidirectional CLIP loss, or with
``--loss siglip`` the sigmoid loss) on a global batch of ``B`` correlated (image, text)
pairs of width ``D``, in one process, checked against the float64 truth of
:mod:`palmtree.testing`. One concern per module:

* :mod:`~palmtree.bench.cases`: what is measured (a case, the default grid, the inputs,
  skip reasons, the loss callable of each implementation and precision);
* :mod:`~palmtree.bench.compiled`: ``chunked+compile``, the chunked loss inside
  ``torch.compile`` (compiled before timing, its compile time in the note);
* :mod:`~palmtree.bench.targets`: ``--labels`` and ``--negatives`` (same-item labels,
  extra negative texts), how a row names them, who cannot take them;
* :mod:`~palmtree.bench.peers`: the other implementations (open_clip's ``ClipLoss`` and
  ``SigLipLoss``, Inf-CL);
* :mod:`~palmtree.bench.measure`: timing, peak memory, out-of-memory, the worker process;
* :mod:`~palmtree.bench.check`: the correctness columns against float64;
* :mod:`~palmtree.bench.sweep`: the sweep over cases and rounds;
* :mod:`~palmtree.bench.csvfile`: the CSV (its columns, old layouts, appending) and the
  output files;
* :mod:`~palmtree.bench.report`: the markdown table, the ratios and their noise, the plot;
* :mod:`~palmtree.bench.options`: the flags, each value checked as it is parsed;
* :mod:`~palmtree.bench.cli`: the checks across flags, and the run.

Timings are never asserted anywhere; this is a measuring tool. Nothing in the library
imports it.
"""

from .cli import main
from .csvfile import FIELDS
from .report import markdown_table, plot

__all__ = ["FIELDS", "main", "markdown_table", "plot"]
