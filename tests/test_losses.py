"""Losses: exact values on small tensors, weights, where gradients flow, and the NaN stop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qfm.errors import ConfigError
from qfm.losses import (
    LossWeights,
    NonFiniteLossError,
    check_finite,
    contrastive_pairs,
    distillation_loss,
    partner_mask,
    qcc_consistency_loss,
    quality_contrastive_loss,
    quality_loss,
    total_loss,
)


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


# ---------------------------------------------------------------------------------------------- quality

def test_quality_loss_exact_and_equal_to_deiqt_criterion():
    pred, target = t(0.0, 0.5, 2.0), t(0.0, 0.0, 0.0)
    # SmoothL1 (beta 1): 0.5 d^2 for |d| < 1, |d| - 0.5 otherwise -> 0, 0.125, 1.5
    assert quality_loss(pred, target).item() == pytest.approx((0.0 + 0.125 + 1.5) / 3)
    assert quality_loss(pred, target).item() == pytest.approx(torch.nn.SmoothL1Loss()(pred, target).item())
    assert quality_loss(pred[:, None], target).item() == pytest.approx(1.625 / 3)
    assert quality_loss(pred, target, beta=0.5).item() == pytest.approx((0 + 0.25 + 1.75) / 3)


def test_quality_loss_per_sample_weights():
    pred, target = t(0.0, 0.5, 2.0, grad=True), t(0.0, 0.0, 0.0)
    loss = quality_loss(pred, target, weight=t(1.0, 2.0, 0.0))
    assert loss.item() == pytest.approx((0.0 + 2 * 0.125 + 0.0) / 3)
    loss.backward()
    assert pred.grad.tolist() == pytest.approx([0.0, 2 * 0.5 / 3, 0.0])  # zero weight -> zero gradient
    assert quality_loss(t(0.0, 0.5, 2.0), target, weight=t(0.5, 0.5, 0.5)).item() == pytest.approx(1.625 / 6)


def test_half_precision_predictions_give_a_float32_loss():
    pred = torch.tensor([0.1234, 0.9], dtype=torch.bfloat16, requires_grad=True)
    target = t(0.1235, 0.2)
    loss = quality_loss(pred, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.5 * ((float(pred[0].detach()) - 0.1235) ** 2 + (0.9 - 0.2) ** 2) / 2, rel=1e-2)
    loss.backward()
    assert pred.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"pred": t(0.1, 0.2), "target": t(0.1, 0.2, 0.3)}, "2 items but target has 3"),
    ({"pred": torch.zeros(2, 3), "target": t(0.1, 0.2)}, "shape \\(B,\\) or \\(B, 1\\)"),
    ({"pred": t(0.1, 0.2), "target": t(0.1, 0.2), "weight": t(1.0, -1.0)}, "finite and >= 0"),
    ({"pred": t(0.1, 0.2), "target": t(0.1, 0.2), "weight": t(1.0)}, "weight has 1 items"),
    ({"pred": t(), "target": t()}, "empty"),
])
def test_quality_loss_rejects_bad_shapes_and_weights(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        quality_loss(**kwargs)


# -------------------------------------------------------------------------------------------------- QCC

def test_qcc_label_mode_is_the_quality_loss_against_the_anchor_label():
    pert, target = t(0.2, 0.9), t(0.4, 0.5)
    expected = (0.5 * 0.2**2 + 0.5 * 0.4**2) / 2
    assert qcc_consistency_loss(pert, target).item() == pytest.approx(expected)


def test_qcc_clean_mode_stops_the_gradient_at_the_clean_prediction():
    pert, clean = t(0.2, 0.9, grad=True), t(0.3, 0.6, grad=True)
    loss = qcc_consistency_loss(pert, t(0.0, 0.0), pred_clean=clean, mode="clean")
    assert loss.item() == pytest.approx((0.5 * 0.01 + 0.5 * 0.09) / 2)
    loss.backward()
    assert clean.grad is None
    assert pert.grad.tolist() == pytest.approx([-0.1 / 2, 0.3 / 2])


def test_qcc_both_mode_is_the_mean_of_the_two():
    pert, target, clean = t(0.2, 0.9), t(0.4, 0.5), t(0.3, 0.6)
    label = qcc_consistency_loss(pert, target, mode="label").item()
    cleanl = qcc_consistency_loss(pert, target, pred_clean=clean, mode="clean").item()
    both = qcc_consistency_loss(pert, target, pred_clean=clean, mode="both").item()
    assert both == pytest.approx(0.5 * (label + cleanl))


def test_qcc_bad_mode_or_missing_clean_prediction():
    with pytest.raises(ConfigError, match="one of"):
        qcc_consistency_loss(t(0.1), t(0.1), mode="anchor")
    with pytest.raises(ConfigError, match="needs pred_clean"):
        qcc_consistency_loss(t(0.1), t(0.1), mode="both")


# ------------------------------------------------------------------------------------------ distillation

def test_distillation_is_smooth_l1_to_a_frozen_teacher():
    student, teacher = t(0.2, 0.8, grad=True), t(0.4, 0.4, grad=True)
    loss = distillation_loss(student, teacher)
    assert loss.item() == pytest.approx((0.5 * 0.04 + 0.5 * 0.16) / 2)
    loss.backward()
    assert teacher.grad is None and student.grad is not None


# ------------------------------------------------------------------------------------------- contrastive

def test_partner_mask():
    mask = partner_mask(torch.tensor([2, -1, -1, 1]))
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 2] = expected[2, 0] = expected[3, 1] = expected[1, 3] = True
    assert torch.equal(mask, expected)
    assert partner_mask(torch.tensor([2, -1, -1]), symmetric=False).nonzero().tolist() == [[0, 2]]
    with pytest.raises(ConfigError, match="partner_index\\[1\\] = 1"):
        partner_mask(torch.tensor([2, 1, -1]))
    with pytest.raises(ConfigError, match="partner_index\\[0\\] = 5"):
        partner_mask(torch.tensor([5, -1, -1]))


def test_contrastive_exact_value_on_a_small_case():
    features = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]], requires_grad=True)
    quality = t(0.5, 0.52, 0.9)
    negatives = partner_mask(torch.tensor([2, -1, 0]))
    pos, neg, valid = contrastive_pairs(quality, negatives, positive_gap=0.05)
    assert valid.tolist() == [True, False, False]  # 1 has a positive but no negative, 2 has no positive
    assert pos.nonzero().tolist() == [[0, 1], [1, 0]] and neg.nonzero().tolist() == [[0, 2], [2, 0]]
    loss = quality_contrastive_loss(features, quality, negatives, temperature=0.5, positive_gap=0.05)
    # anchor 0: positive 1 at cosine 1, negative 2 at cosine 0 -> -log(e^2 / (e^2 + e^0))
    assert loss.item() == pytest.approx(math.log(1.0 + math.exp(-2.0)), rel=1e-6)
    loss.backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()


def _reference_contrastive(features, quality, negatives, temperature, gap):
    z = F.normalize(features, dim=1)
    sim = (z @ z.T) / temperature
    losses = []
    n = len(quality)
    for i in range(n):
        negs = [j for j in range(n) if j != i and negatives[i, j]]
        poss = [j for j in range(n) if j != i and not negatives[i, j] and abs(quality[i] - quality[j]) <= gap]
        if not negs or not poss:
            continue
        neg_sum = sum(math.exp(sim[i, j]) for j in negs)
        losses.append(sum(-math.log(math.exp(sim[i, p]) / (math.exp(sim[i, p]) + neg_sum)) for p in poss)
                      / len(poss))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("seed", range(5))
def test_contrastive_matches_a_plain_loop(seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(12, 8, generator=g, dtype=torch.float64)
    quality = torch.rand(12, generator=g, dtype=torch.float64)
    partners = torch.tensor([(i + 6) % 12 for i in range(6)] + [-1] * 6)
    negatives = partner_mask(partners)
    got = quality_contrastive_loss(features, quality, negatives, temperature=0.2, positive_gap=0.15).item()
    ref = _reference_contrastive(features, quality.tolist(), negatives, 0.2, 0.15)
    assert got == pytest.approx(ref, rel=1e-9)


def test_contrastive_lower_when_positives_are_close():
    quality = t(0.5, 0.5, 0.9)
    negatives = partner_mask(torch.tensor([2, -1, 0]))
    negative_feature = [0.0, 1.0]
    close = torch.tensor([[1.0, 0.0], [0.95, 0.05], negative_feature])
    far = torch.tensor([[1.0, 0.0], [-0.9, 0.1], negative_feature])
    loss_close = quality_contrastive_loss(close, quality, negatives)
    loss_far = quality_contrastive_loss(far, quality, negatives)
    assert loss_close.item() < 0.01
    assert loss_far.item() > 1.0


def test_contrastive_with_no_valid_anchor_is_zero_and_attached():
    features = torch.randn(3, 4, requires_grad=True)
    loss = quality_contrastive_loss(features, t(0.1, 0.5, 0.9), torch.zeros(3, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad


def test_contrastive_bad_arguments():
    features, quality, mask = torch.randn(3, 4), t(0.1, 0.5, 0.9), torch.zeros(3, 3, dtype=torch.bool)
    with pytest.raises(ConfigError, match="temperature"):
        quality_contrastive_loss(features, quality, mask, temperature=0.0)
    with pytest.raises(ConfigError, match="shape \\(3, 3\\)"):
        quality_contrastive_loss(features, quality, torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ConfigError, match="3 rows but quality has 2"):
        quality_contrastive_loss(features, t(0.1, 0.2), mask)


# ----------------------------------------------------------------------------------------- total, NaN

def test_loss_weights_validation():
    assert LossWeights.from_dict({"lambda_qcc": 0.5}).lambda_qcc == 0.5
    with pytest.raises(ConfigError, match="lambda_kd must be a finite number >= 0"):
        LossWeights(lambda_kd=-1.0)
    with pytest.raises(ConfigError, match="lambda_con"):
        LossWeights(lambda_con=float("nan"))
    with pytest.raises(ConfigError, match="unknown loss weight.*lamda_qcc"):
        LossWeights.from_dict({"lamda_qcc": 1.0})


def test_total_loss_weights_and_logs():
    w = LossWeights(lambda_qcc=0.5, lambda_con=0.0, lambda_pl=2.0, lambda_kd=0.1)
    quality = torch.tensor(0.4, requires_grad=True)
    parts = {"quality": quality, "qcc": torch.tensor(0.2), "contrastive": torch.tensor(float("nan")),
             "pseudo": torch.tensor(0.1), "distill": torch.tensor(1.0)}
    total, log = total_loss(parts, w)
    assert total.item() == pytest.approx(0.4 + 0.5 * 0.2 + 2.0 * 0.1 + 0.1 * 1.0)  # lambda_con = 0: not added
    assert log["loss"] == pytest.approx(0.8)
    assert log["loss_qcc"] == pytest.approx(0.2) and math.isnan(log["loss_contrastive"])
    total.backward()
    assert quality.grad.item() == 1.0


def test_total_loss_errors():
    with pytest.raises(ConfigError, match="unknown loss part.*'qc'"):
        total_loss({"qc": torch.tensor(1.0)}, LossWeights())
    with pytest.raises(ConfigError, match="no loss part contributes"):
        total_loss({"contrastive": torch.tensor(1.0)}, LossWeights(lambda_con=0.0))
    with pytest.raises(ConfigError, match="scalar tensor"):
        total_loss({"quality": torch.ones(3)}, LossWeights())


def test_check_finite_names_step_batch_and_part():
    check_finite(torch.tensor(0.3), step=5, batch_ids=["a.jpg"])
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 17; batch images: img_3\.bmp, img_9\.bmp; "
                                                 r"non-finite parts: loss_qcc=nan"):
        check_finite(torch.tensor(float("nan")), step=17, batch_ids=["img_3.bmp", "img_9.bmp"],
                     parts={"loss_quality": 0.2, "loss_qcc": float("nan")})
    with pytest.raises(NonFiniteLossError, match="loss is inf at step 2.*… \\(25 in all\\)"):
        check_finite(torch.tensor(float("inf")), step=2, batch_ids=[f"i{k}" for k in range(25)])
