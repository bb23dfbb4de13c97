"""The four neuron-level metrics (analyses.common.metrics) against hand-computed values on tiny
tensors, their conventions for negative and zero activations (never NaN), and their errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch


def brute_force_auroc(scores: list[float], positive: list[bool]) -> float:
    """P(score of a positive > score of a negative) + 1/2 P(tie), by counting all pairs."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_selectivity_hand_values():
    from analyses.common.metrics import selectivity

    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    cls = torch.tensor([
        [5.0, 1.0, 3.0, 0.0, -1.0],  # image of class 0
        [4.0, 1.0, 1.0, 1.0, -2.0],
        [1.0, 1.0, 2.0, 5.0, -3.0],
        [0.0, 1.0, 1.0, 6.0, -4.0],
        [2.0, 1.0, 0.0, 7.0, -5.0],
        [3.0, 1.0, 2.0, 8.0, -6.0],
    ])
    auc = selectivity(cls, labels, target=0)
    assert auc.shape == (5,)
    assert auc[0] == pytest.approx(1.0)  # separates class 0 perfectly
    assert auc[1] == pytest.approx(0.5)  # constant: no discrimination
    assert auc[3] == pytest.approx(0.0)  # anti-selective
    assert auc[4] == pytest.approx(1.0)  # negative activations are fine: AUROC is rank-based
    positive = (labels == 0).tolist()
    assert auc[2] == pytest.approx(brute_force_auroc(cls[:, 2].tolist(), positive))  # with ties
    assert auc[2] == pytest.approx((4 + 0 + 0.5 + 1 + 0) / 8)  # positives 3, 1 vs 2, 1, 0, 2: one tie
    assert selectivity(cls, labels, target=2)[3] == pytest.approx(1.0)


def test_class_variance_hand_values_and_conventions():
    from analyses.common.metrics import class_variance

    labels = torch.tensor([1, 1, 1, 0, 0])
    m = torch.tensor([
        [1.0, 0.0, -1.0, 2.0, -0.5],
        [2.0, 0.0, -2.0, 2.0, 1.0],
        [3.0, 0.0, -3.0, 2.0, 2.0],
        [9.0, 0.0, -4.0, 5.0, -3.0],
        [7.0, 0.0, -5.0, 1.0, 9.0],
    ])
    cv = class_variance(m, labels, target=1)
    assert cv[0] == pytest.approx(math.sqrt(2 / 3) / 2)  # values 1,2,3: population std / mean
    assert cv[1] == 0.0  # all zero: silent on the class, defined as 0 (not NaN)
    assert cv[2] == 0.0  # all negative -> clamped to 0 -> silent
    assert cv[3] == 0.0  # constant positive
    assert cv[4] == pytest.approx(math.sqrt(2 / 3))  # clamp: -0.5, 1, 2 -> 0, 1, 2: mean 1, var 2/3
    shifted = class_variance(m, labels, target=1, negatives="shift")
    # shift: unit 2's minimum over all images is -5 -> class values 4,3,2: std sqrt(2/3), mean 3
    assert shifted[2] == pytest.approx(math.sqrt(2 / 3) / 3)
    # unit 4: minimum -3 -> 2.5, 4, 5 -> mean 11.5/3
    values = torch.tensor([2.5, 4.0, 5.0], dtype=torch.float64)
    assert shifted[4] == pytest.approx(float(values.std(correction=0) / values.mean()))
    assert shifted[0] == pytest.approx(cv[0])  # non-negative units are not shifted
    one = class_variance(m, labels, target=0)  # two images; a one-image class gives 0
    assert torch.isfinite(one).all()
    assert class_variance(m[:4], labels[:4], target=0).eq(0).all()


def test_label_entropy_hand_values_and_conventions():
    from analyses.common.metrics import class_distribution, label_entropy

    labels = torch.tensor([0, 0, 1, 1, 2])
    m = torch.tensor([
        [1.0, 1.0, 0.0, -1.0, 0.5],
        [0.0, 1.0, 0.0, -1.0, 0.5],
        [3.0, 1.0, 0.0, -2.0, 0.0],
        [0.0, 1.0, 0.0, -1.0, 0.0],
        [0.0, 2.0, 0.0, -1.0, 0.0],
    ])
    h = label_entropy(m, labels, n_classes=4)  # class 3 has no images: contributes 0 log 0 = 0
    p = torch.tensor([0.25, 0.75])
    assert h[0] == pytest.approx(float(-(p * p.log()).sum()))  # masses 1 and 3
    assert h[1] == pytest.approx(math.log(3))  # masses 2, 2, 2
    assert h[2] == pytest.approx(math.log(4))  # silent unit: uniform, maximal entropy
    assert h[3] == pytest.approx(math.log(4))  # all negative -> clamped -> silent
    assert h[4] == pytest.approx(0.0, abs=1e-7)  # responds to class 0 only
    dist = class_distribution(m, labels, 4)
    assert torch.allclose(dist.sum(0), torch.ones(5))
    assert torch.allclose(dist[:, 0], torch.tensor([0.25, 0.75, 0.0, 0.0]))
    shifted = label_entropy(m, labels, n_classes=4, negatives="shift")
    # unit 3 shifted by +2: 1, 1, 0, 1, 1 -> masses 2, 1, 1 of 4
    q = torch.tensor([0.5, 0.25, 0.25])
    assert shifted[3] == pytest.approx(float(-(q * q.log()).sum()))


def test_normalized_logit_change_hand_values():
    from analyses.common.metrics import normalized_logit_change

    clean = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-6.0, 8.0]])
    ablated = torch.tensor([[1.0, 4.0], [0.0, 1.0], [-1.0, 0.0]])
    change = normalized_logit_change(clean, ablated, target=0)
    assert change.tolist() == pytest.approx([0.4, 0.0, -0.5])  # (3-1)/5, 0 (zero norm floored), (-6+1)/10
    with pytest.raises(ValueError, match="out of range"):
        normalized_logit_change(clean, ablated, target=2)


def test_no_nan_for_all_negative_and_all_zero_units():
    from analyses.common.metrics import class_variance, label_entropy, selectivity

    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    table = torch.stack([torch.zeros(6), -torch.rand(6, generator=torch.Generator().manual_seed(0)) - 0.1,
                         torch.full((6,), -3.0), torch.full((6,), 1e-30)], dim=1)
    for negatives in ("clamp", "shift"):
        for target in (0, 1, 2):
            assert torch.isfinite(class_variance(table, labels, target, negatives)).all()
            assert torch.isfinite(selectivity(table, labels, target)).all()
        assert torch.isfinite(label_entropy(table, labels, 3, negatives)).all()
    assert selectivity(table, labels, 0)[0] == pytest.approx(0.5)


def test_metric_errors_are_clear():
    from analyses.common.metrics import class_variance, label_entropy, response, selectivity

    labels = torch.tensor([0, 0, 1])
    acts = torch.rand(3, 2)
    with pytest.raises(ValueError, match="class 5 has no images"):
        selectivity(acts, labels, 5)
    with pytest.raises(ValueError, match="other classes"):
        selectivity(acts[:2], labels[:2], 0)
    with pytest.raises(ValueError, match="class 2 has no images"):
        class_variance(acts, labels, 2)
    with pytest.raises(ValueError, match="NaN"):
        class_variance(torch.tensor([[float("nan")], [1.0], [1.0]]), labels, 0)
    with pytest.raises(ValueError, match="out of range"):
        label_entropy(acts, labels, n_classes=1)
    with pytest.raises(ValueError, match="no images"):
        label_entropy(acts[:0], labels[:0], n_classes=2)
    with pytest.raises(ValueError, match="negatives"):
        response(acts, "abs")


def test_rank_based_selectivity_equals_sklearn():
    """The runner's fast path (one ranking shared by all classes) gives scikit-learn's AUROC."""
    from scipy.stats import rankdata

    from analyses.common.metrics import average_ranks, selectivity, selectivity_from_ranks

    generator = torch.Generator().manual_seed(0)
    acts = torch.randint(-3, 4, (120, 9), generator=generator).float()  # many ties
    acts[:, 4] = 2.0  # constant unit
    labels = torch.randint(0, 5, (120,), generator=generator)
    ranks = average_ranks(acts)
    assert torch.equal(ranks.double(), torch.from_numpy(rankdata(acts.numpy(), axis=0)))
    for target in range(5):
        torch.testing.assert_close(selectivity_from_ranks(ranks, labels, target), selectivity(acts, labels, target),
                                   rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="class 7 has no images"):
        selectivity_from_ranks(ranks, labels, 7)
