"""``palmtree verify``: check the distributed losses on this machine against float64.

Two ways to run it::

    palmtree verify --nproc 3                      # 3 local ranks, gloo on CPU
    torchrun --nproc-per-node 8 -m palmtree verify  # the launched world (NCCL on GPUs)

Every rank regenerates the same seeded global batch (:func:`palmtree.testing.make_pairs`,
unnormalised pairs) and takes its slice of an uneven split (rank 1 holds nothing when
there are 3 or more ranks). For each loss (CLIP at every temperature; SigLIP at the
largest, with bias -10 and +10), backend and matmul precision, the ranks run the loss
and its backward, and compare with :mod:`palmtree.testing`'s float64 truth of one
process on the whole batch, under its rules (:mod:`.rules`, docs/design.md §8). Each
loss then runs again at the largest temperature (SigLIP: bias -10) with global targets
(:mod:`.targets`, docs/design.md §10): same-item labels ``i % 3`` under
``same_label="positive"`` and ``"ignore"``, each with extra text negatives split
unevenly over the ranks (none on rank 0), and the negatives alone. Each row compares:

* ``loss``: each rank's returned value (``N * share_r``), ``loss_global`` (and SigLIP's
  ``loss_pos``, ``loss_neg``), and ``d_scale``, ``d_bias``: the temperature's and the
  bias's gradients averaged over ranks (what DDP applies), each within the bound that
  the float64 reference derives from the computation, relative to the value;
* ``d_image``, ``d_text``: each rank's feature gradients (``N * dL/dx_r``, what a rank
  holds before DDP's average), within twice the error of a plain fp32 computation with
  the same operand rounding, plus ``1e-6`` of the largest entry. The plain computation
  materialises the ``B x B`` logits on each rank's device, which sets the largest
  ``--batch`` (tens of thousands on a GPU): the gradient tensors have no bound derived
  from the computation, and a plain computation is what defines "as exact as fp32" for
  them.
* ``d_neg`` (the rows with targets): each rank's gradient of its negatives, as the
  feature gradients are.

Exit status: 0 when every row passes, 1 on a failed row (a NaN anywhere fails it), a
rank that raised, a timeout (the message names the ranks), or a rank that did not exit
cleanly after reporting, 2 on bad arguments. ``--json`` prints one JSON object instead
of the table.

Modules: :mod:`.options` (flags), :mod:`.checks` (what each rank computes),
:mod:`.targets` (the labels and negatives), :mod:`.truth` (the truth and the tensors'
bounds), :mod:`.rules` (how a row passes), :mod:`.spawn` and :mod:`.launched` (the two worlds),
:mod:`.report` (table and JSON), :mod:`.cli` (``main``).
"""

from .cli import main

__all__ = ["main"]
