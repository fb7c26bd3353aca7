"""Ground truth for contrastive losses: seeded pairs, a float64 truth, error bounds.

What palmtree's own tests, ``palmtree verify`` and ``palmtree bench`` check against, and
what you can call in your own tests::

    from palmtree import clip_loss, testing

    img, txt = testing.make_pairs(512, 64, seed=0)
    exact = testing.clip_truth(img, txt, logit_scale=2.3)
    out = clip_loss(img, txt, torch.tensor(2.3))
    testing.check_scalar("loss", out.loss, exact.loss, exact.loss_bound)

Same-item ``labels`` (``same_label="positive"`` or ``"ignore"``) and extra text
``negatives`` go to the truths and the plain baselines alike, as keywords (the truths'
``d_neg`` is the negatives' gradient).

One module per concern: :mod:`.pairs` (seeded inputs), :mod:`.truth_clip` and
:mod:`.truth_siglip` (the float64 truths, CLIP's backward in :mod:`.truth_clip_backward`,
on :mod:`.problem`, :mod:`.targets` and :mod:`.rounding`), :mod:`.plain` (the naive
fp32 baseline) and :mod:`.rules` (the comparisons). ``reference``/``Reference`` and
``siglip_reference``/``SigLipReference`` are the truths' older names, kept as aliases;
the truth is float64 and is not the loss's fp32 ``backend="reference"``.

How close an fp32 result must be (docs/design.md, "What exact means"):

* **Scalars that are sums** (the loss, each rank's share, the temperature's gradient)
  must lie within a bound derived from the computation itself, here, in float64, from
  first-order error analysis: every fp32 logit is off by at most
  ``E_ij = s * (gamma(2D + 4) * sum_k |u_ik v_jk| + gamma(5))`` (normalisation, the
  ``D``-term dot product, the scale and the shift before ``exp``; ``gamma(n) = n u /
  (1 - n u)``, ``u = 2**-24``), each loss term ``t = lse - sum_j a_j S_j`` (``a_j`` the
  target weights: 1 at the own pair, ``1 / |P|`` at each pair of a same-item label, 0
  elsewhere; :mod:`.targets`) moves by at most ``sum_j |p_j - a_j| E_j`` under those
  errors (an ignored entry has ``p_j = a_j = 0``) and is formed to ``gamma(3n + 3)``
  relative over its ``n`` columns (the texts and any extra negatives), and sums of ``n``
  terms add ``gamma(n)`` times the sum of their absolute values (each operation may also
  lose ``2**-149`` to underflow). The bound is relative to the loss (no absolute
  allowance above fp32's underflow), so a small loss must keep its digits too. It is a
  worst case, not a typical error: correct fp32 code sits far inside it; the defects it
  exists for (an ``lse - logit`` cancelling at magnitude ``scale``) leave it by orders
  of magnitude. A term of several targets is formed so too: from non-negative parts,
  the mean of ``max - S_j`` over them plus ``log`` of the sum, not ``max`` less their
  mean logit, which cancels at magnitude ``scale`` where duplicates nearly coincide.
  The CLIP temperature's gradient is formed, here as in the backends, from each
  similarity's difference to its row's and its column's positive
  (:mod:`palmtree.backends.base`), and bounded as formed: at a peaked softmax that too
  is relative to the value, which ``sum G * (U V^T)``, cancelling to ``eps / loss``, is
  not. Where a row has several targets its similarities are measured against their
  mean (off by that mean's own rounding), every term included.
* **Gradient tensors** must be within ``2 x`` the error of a plain fp32 computation of
  the same gradient (materialised logits, autograd), plus ``1e-6`` of their largest
  entry: :func:`check_tensor`. This is the maximum over many entries, each carrying the
  rounding of its logits; a correct implementation has the same error distribution
  as the plain one, so its maximum lies within a small factor of the plain maximum.
  It catches gradients normalised inconsistently (a positive's ``p - 1`` left with
  ``eps * scale`` of error where the truth is ~0) by orders of magnitude. Where the
  truth is exactly 0 (raw-feature gradients at ``D = 1``) the ``1e-6`` is of a ``size``
  given instead: :func:`tensor_bound`.
"""

from .pairs import KINDS, make_pairs
from .plain import plain_fp32, plain_fp32_siglip
from .rounding import OPERAND_UNIT, UNDERFLOW, UNIT_ROUNDOFF, gamma
from .rules import check_scalar, check_tensor, max_error, tensor_bound, worst_of_orders
from .truth_clip import ClipTruth, clip_truth
from .truth_siglip import SigLipTruth, siglip_truth

# The truths' older names: callers written against them keep working.
Reference = ClipTruth
reference = clip_truth
SigLipReference = SigLipTruth
siglip_reference = siglip_truth

__all__ = [
    "KINDS",
    "OPERAND_UNIT",
    "UNDERFLOW",
    "UNIT_ROUNDOFF",
    "ClipTruth",
    "Reference",
    "SigLipReference",
    "SigLipTruth",
    "check_scalar",
    "check_tensor",
    "clip_truth",
    "gamma",
    "make_pairs",
    "max_error",
    "plain_fp32",
    "plain_fp32_siglip",
    "reference",
    "siglip_reference",
    "siglip_truth",
    "tensor_bound",
    "worst_of_orders",
]
