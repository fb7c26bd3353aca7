"""The float64 truths with global targets: same-item labels and extra negative columns.

Three claims. Labels that are all distinct change nothing, bit for bit. With duplicates
(each pair's label shared or ignored) and negatives, the truths equal a brute-force
float64 computation written here from the definitions (materialised logits, masks,
``log_softmax``, autograd) to float64's rounding. The plain fp32 baselines agree with
the truths to fp32's, and their losses lie within the truths' bounds: a bound that a
plain fp32 formation leaves is a wrong bound.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from palmtree import testing
from palmtree.normalize import NORM_EPS

B, D = 8, 6
SIZES, WEIGHTS = [3, 0, 5], [1.0, 2.0, -0.5]
DUPLICATES = torch.tensor([4, 1, 4, 2, 1, 9, 4, 7])
LABELS = {
    "duplicates": DUPLICATES,
    "all equal": torch.full((B,), 3),
    "distinct": torch.arange(B),
    "none": None,
}


def _problem(seed=0, n_neg=3, kind="correlated"):
    img, txt = testing.make_pairs(B, D, seed=seed, kind=kind)
    g = torch.Generator().manual_seed(seed + 1)
    negatives = torch.randn(n_neg, D, generator=g) * 2 if n_neg is not None else None
    return img, txt, negatives


def _truth(loss, img, txt, **kw):
    if loss == "clip":
        return testing.clip_truth(img, txt, 2.3, **kw)
    return testing.siglip_truth(img, txt, 2.3, -4.0, **kw)


def _all_fields(truth) -> dict[str, torch.Tensor]:
    fields = {k: torch.as_tensor(v) for k, v in dataclasses.asdict(truth).items()}
    return {**fields, "d_neg": truth.d_neg, "d_neg_size": torch.tensor(truth.d_neg_size)}


# --- 1. distinct labels are no labels ------------------------------------------------


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("same_label", ["positive", "ignore"])
def test_distinct_labels_change_nothing_bit_for_bit(loss, same_label):
    img, txt, _ = _problem(seed=2)
    kw = dict(sizes=SIZES, weights=WEIGHTS, precision="bf16", block=3)
    want = _all_fields(_truth(loss, img, txt, **kw))
    huge = torch.randperm(B, generator=torch.Generator().manual_seed(5)) * 10**12 - 5 * 10**15
    for labels in (torch.arange(B), huge, torch.arange(B, dtype=torch.int32) - 4):
        for negatives in (None, torch.zeros(0, D)):
            truth = _truth(
                loss, img, txt, labels=labels, same_label=same_label, negatives=negatives, **kw
            )
            got = _all_fields(truth)
            assert got.keys() == want.keys()
            for name, value in want.items():
                assert got[name].shape == value.shape, name
                assert torch.equal(got[name], value), name


# --- 2. the truths against a brute-force float64 autograd ---------------------------


def _leaves(img, txt, negatives, normalize):
    """float64 leaves and the unit images and columns (texts, then negatives)."""
    leaves = [x.detach().double().requires_grad_() for x in (img, txt)]
    if negatives is not None:
        leaves.append(negatives.detach().double().requires_grad_())
    unit = [F.normalize(x, dim=1, eps=NORM_EPS) if normalize else x for x in leaves]
    return leaves, unit[0], torch.cat(unit[1:])


def _masks(labels, same_label, n_cols):
    """Each row's targets and ignored entries, ``[B, B + Nn]`` (the negatives: neither)."""
    y = torch.arange(B) if labels is None else labels
    same, eye = y[:, None] == y[None, :], torch.eye(B, dtype=torch.bool)
    target, ignored = (eye, same & ~eye) if same_label == "ignore" else (same, same & False)
    pad = torch.zeros(B, n_cols - B, dtype=torch.bool)
    return torch.cat([target, pad], 1), torch.cat([ignored, pad], 1)


def _brute(loss, img, txt, *, labels, same_label, negatives, sizes, weights, normalize=True):
    leaves, u, cols = _leaves(img, txt, negatives, normalize)
    theta = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    S = theta.exp().clamp(max=100.0 if loss == "clip" else math.inf) * u @ cols.T
    target, ignored = _masks(labels, same_label, S.shape[1])
    out = {}
    if loss == "clip":
        a = target.double() / target.sum(1, keepdim=True)
        S = S.masked_fill(ignored, -math.inf)
        row = -torch.where(target, a * S.log_softmax(1), 0.0).sum(1)
        col = -torch.where(target[:, :B], a[:, :B] * S[:, :B].log_softmax(0), 0.0).sum(0)
        terms = (row + col) / (2 * B)
        out.update(loss_i2t=row.sum() / B, loss_t2i=col.sum() / B)
    else:
        bias = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
        x = -torch.where(target, 1.0, -1.0) * (S + bias)
        t = torch.where(ignored, 0.0, x.clamp_min(0) + torch.log1p(torch.exp(-x.abs())))
        terms = t.sum(1) / B
        out.update(loss_pos=t[target].sum() / B, loss_neg=t[~target & ~ignored].sum() / B)
    shares = torch.stack([part.sum() for part in terms.split(sizes or [B])])
    (shares * torch.tensor(weights or [1.0], dtype=torch.float64)).sum().backward()
    out.update(loss=shares.sum(), shares=shares, d_scale=theta.grad)
    out.update(d_img=leaves[0].grad, d_txt=leaves[1].grad)
    out["d_neg"] = leaves[2].grad if negatives is not None else torch.zeros(0, D).double()
    if loss == "siglip":
        out["d_bias"] = bias.grad
    return {k: v.detach() for k, v in out.items()}


CASES = [
    # labels, same_label, negatives, split over ranks
    ("duplicates", "positive", None, True),
    ("duplicates", "ignore", None, True),
    ("duplicates", "positive", 3, True),
    ("duplicates", "ignore", 3, False),
    ("all equal", "positive", 3, True),
    ("all equal", "ignore", 3, True),
    ("distinct", "positive", 3, True),
    ("none", "positive", 3, True),
    ("none", "positive", 0, False),
]


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("labels,same_label,n_neg,split", CASES)
def test_the_truth_is_the_brute_force_float64(loss, labels, same_label, n_neg, split):
    img, txt, negatives = _problem(seed=7, n_neg=n_neg)
    kw = dict(labels=LABELS[labels], same_label=same_label, negatives=negatives)
    kw.update(sizes=SIZES, weights=WEIGHTS) if split else kw.update(sizes=None, weights=None)
    want = _brute(loss, img, txt, **kw)
    for block in (None, 3):
        truth = _truth(loss, img, txt, block=block, **kw)
        for name, value in want.items():
            got = getattr(truth, name)
            assert got.shape == value.shape, name
            size = float(value.abs().max()) if value.numel() else 0.0
            assert testing.max_error(got, value) <= 1e-12 * size, (name, block)


def test_the_truth_without_normalisation_is_the_brute_force_too():
    img, txt, negatives = _problem(seed=3)
    kw = dict(labels=DUPLICATES, same_label="positive", negatives=negatives, sizes=SIZES)
    kw["weights"] = WEIGHTS
    for loss in ("clip", "siglip"):
        want = _brute(loss, img, txt, normalize=False, **kw)
        truth = _truth(loss, img, txt, normalize=False, logit_scale_max=math.inf, **kw)
        for name, value in want.items():
            size = float(value.abs().max()) if value.numel() else 0.0
            assert testing.max_error(getattr(truth, name), value) <= 1e-12 * size, name


# --- 3. plain fp32 against the truth, and within its bounds --------------------------

PLAIN_CASES = [
    ("duplicates", "positive", 3, "correlated"),
    ("duplicates", "ignore", 3, "correlated"),
    ("all equal", "positive", 0, "aligned"),
    ("duplicates", "ignore", 3, "aligned"),
    ("none", "positive", 3, "adversarial"),
]


def _plain(loss, img, txt, **kw):
    if loss == "clip":
        return testing.plain_fp32(img, txt, 2.3, **kw)
    return testing.plain_fp32_siglip(img, txt, 2.3, -4.0, **kw)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("labels,same_label,n_neg,kind", PLAIN_CASES)
def test_plain_fp32_agrees_and_lies_within_the_bounds(loss, labels, same_label, n_neg, kind):
    """At ``s = 10``, where no term is tiny: plain ``cross_entropy`` forms a lone target's
    term as ``lse - S_ii``, which cancels at magnitude ``s`` and leaves the bound at
    losses below about 1e-4 (the defect the bound exists for, with or without labels).
    Several targets' terms are at least ``log 2``: there plain fp32 keeps within it."""
    img, txt, negatives = _problem(seed=11, n_neg=n_neg, kind=kind)
    kw = dict(labels=LABELS[labels], same_label=same_label, negatives=negatives)
    kw.update(sizes=SIZES, weights=WEIGHTS)
    truth = _truth(loss, img, txt, **kw)
    plain = _plain(loss, img, txt, **kw)
    assert set(plain) >= {"shares", "d_img", "d_txt", "d_scale", "d_neg"}
    for name, value in plain.items():
        exact = getattr(truth, name)
        size = float(exact.abs().max()) if exact.numel() else 0.0
        assert testing.max_error(value, exact) <= 1e-4 * size, name
    loss_plain = plain["shares"].double().sum()
    testing.check_scalar("loss", loss_plain, truth.loss, truth.loss_bound)
    for share, exact, bound in zip(plain["shares"], truth.shares, truth.share_bounds, strict=True):
        testing.check_scalar("share", share, exact, float(bound))


def _formed_d_scale(img, txt, negatives, theta, labels, same_label, sizes, weights):
    """``dJ/dtheta`` in fp32 as the backends form it: each similarity against its row's
    and its column's mean target similarity, a lone target's own term left out."""
    u = F.normalize(img.float(), dim=1, eps=NORM_EPS)
    cols = F.normalize(torch.cat([txt, negatives]).float(), dim=1, eps=NORM_EPS)
    dot = u @ cols.T
    target, ignored = _masks(labels, same_label, dot.shape[1])
    S = (math.exp(theta) * dot).masked_fill(ignored, -math.inf)
    p_row, p_col = S.softmax(1), S[:, :B].softmax(0)
    a = target[:, :B].float() / target.sum(1, keepdim=True)
    m, c = (a * dot[:, :B]).sum(1), (a * dot[:, :B]).sum(0)
    w = torch.tensor(weights).repeat_interleave(torch.tensor(sizes)) / (2 * B)
    lone = target[:, :B] & (target.sum(1, keepdim=True) == 1)
    rows = (w[:, None] * p_row * (dot - m[:, None]))[:, :B].masked_fill(lone, 0.0)
    cols_ = (w[None] * p_col * (dot[:, :B] - c[None])).masked_fill(lone, 0.0)
    extra = (w[:, None] * p_row * (dot - m[:, None]))[:, B:]
    return math.exp(theta) * float(rows.sum() + extra.sum() + cols_.sum())


@pytest.mark.parametrize("labels,same_label,n_neg,kind", PLAIN_CASES)
@pytest.mark.parametrize("theta", [2.3, 4.6])
def test_the_temperature_formed_as_the_backends_lies_within_its_bound(
    labels, same_label, n_neg, kind, theta
):
    """Also at a peaked softmax (``s = 100``, aligned pairs), where plain autograd's
    ``sum G * dot`` cancels and leaves the bound: the bound is relative to the value."""
    img, txt, negatives = _problem(seed=13, n_neg=n_neg, kind=kind)
    kw = dict(labels=LABELS[labels], same_label=same_label, sizes=SIZES, weights=WEIGHTS)
    truth = testing.clip_truth(img, txt, theta, negatives=negatives, **kw)
    formed = _formed_d_scale(img, txt, negatives, theta, **kw)
    testing.check_scalar("d_scale", formed, truth.d_scale, truth.d_scale_bound)
    assert truth.d_scale_bound <= 1e-2 * abs(float(truth.d_scale))


def test_worst_of_orders_permutes_the_negatives_with_the_features():
    img, txt, negatives = _problem(seed=17)
    kw = dict(labels=DUPLICATES, sizes=SIZES, weights=WEIGHTS)
    exact = vars(testing.clip_truth(img, txt, 2.3, negatives=negatives, **kw))
    plain = testing.worst_of_orders(
        lambda i, t, negatives: testing.plain_fp32(i, t, 2.3, negatives=negatives, **kw),
        img,
        txt,
        exact,
        negatives=negatives,
    )
    for name in ("d_img", "d_txt", "d_neg"):
        size = float(exact[name].abs().max())
        assert 0 < testing.max_error(plain[name], exact[name]) <= 1e-5 * size, name
