"""Per-batch training steps: the plain DEIQT step (teacher, baseline) and the QCC student step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from qfm.errors import ConfigError
from qfm.losses import (
    LossWeights,
    contrastive_pairs,
    distillation_loss,
    global_share,
    part_statistics,
    partner_mask,
    qcc_consistency_loss,
    quality_contrastive_loss,
    quality_loss,
    total_loss,
)
from qfm.snm.mining import check_rule
from qfm.train.distributed import ranks, sum_over_ranks
from qfm.train.engine import to_device
from qfm.train.sampler import pairs_in_batch


def crop_targets(batch: dict, device: torch.device) -> torch.Tensor:
    """The image's MOS repeated for each of its crops."""
    return torch.repeat_interleave(batch["mos"], batch["n_crops"]).to(device)


def batch_loss(parts: dict[str, torch.Tensor], counts: dict[str, int], weights: LossWeights,
               device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted total of a batch's loss parts (each a mean over ``counts[part]`` items) and its log.

    In one process: ``total_loss`` as it is. Under N data-parallel ranks each part is normalised by its item
    count summed over the ranks (``global_share``), so that the gradient DDP averages is the one process's
    gradient of the whole global batch, and every rank logs the global batch's losses."""
    world = ranks().world
    if world == 1:
        return total_loss(parts, weights)
    totals = sum_over_ranks(part_statistics(parts, counts), device)
    return global_share(parts, counts, totals, weights, world)


def plain_step(model: nn.Module, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """SmoothL1 between every crop's prediction and its image's MOS."""
    pred = model(to_device(batch["image"], device))
    return batch_loss({"quality": quality_loss(pred, crop_targets(batch, device))}, {"quality": len(pred)},
                      LossWeights(), device)


class QccStep:
    """The student step: quality loss on labelled crops, weighted loss on pseudo-labelled crops, and, for
    each anchor whose SNM partner is in the batch (PairBatches puts it right after the anchor), the QCC
    consistency loss on T' = T + alpha * stop_grad(T_partner), crop k of the anchor with crop k of the
    partner. Optional quality-aware contrastive and distillation terms.

    Logged per step: ``n_qcc_pairs`` (anchor-partner image pairs in the batch) and, only in steps that
    had pairs, ``loss_qcc``. With lambda_pl = 0 pseudo-labelled images have no loss to train on: the
    training set must leave them out, and a batch that holds one is an error. The contrastive term takes
    ``aliasing`` partners (close features, different quality) as negatives; ``semantic`` partners (same
    quality) are positives, and the negatives are the crops whose quality differs by more than
    ``positive_gap``.
    """

    def __init__(self, partners: Mapping[int, Sequence[int]], is_pseudo: np.ndarray, weights: LossWeights, *,
                 qcc: bool = True, alpha: float = 0.5, mode: str = "label", temperature: float = 0.1,
                 positive_gap: float = 0.05, rule: str = "aliasing",
                 teacher_scores: np.ndarray | None = None) -> None:
        self.partners = partners
        self.is_pseudo = torch.as_tensor(np.asarray(is_pseudo, dtype=bool))
        self.weights, self.qcc, self.alpha, self.mode, self.temperature = weights, qcc, alpha, mode, temperature
        self.positive_gap, self.rule = positive_gap, check_rule(rule)
        self.teacher = None if teacher_scores is None else torch.as_tensor(teacher_scores, dtype=torch.float32)

    def __call__(self, model: nn.Module, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        crop_counts = batch["n_crops"]
        target = crop_targets(batch, device)
        pseudo = torch.repeat_interleave(self.is_pseudo[batch["index"]], crop_counts).to(device)
        if self.weights.lambda_pl == 0 and bool(pseudo.any()):
            raise ConfigError("a training batch holds pseudo-labelled images but lambda_pl is 0, so they would "
                              "train on nothing; leave them out of the training set (use_pseudo_labels: false)")
        tokens = model.encode(to_device(batch["image"], device))
        pred, features = model.decode(tokens, return_features=True)
        parts: dict[str, torch.Tensor] = {}
        labelled, pseudo_crops = int((~pseudo).sum()), int(pseudo.sum())
        items = {"quality": labelled, "pseudo": pseudo_crops, "distill": labelled}  # what each part averages
        if labelled:
            parts["quality"] = quality_loss(pred[~pseudo], target[~pseudo])
        if pseudo_crops:
            parts["pseudo"] = quality_loss(pred[pseudo], target[pseudo])
        pairs = pairs_in_batch(batch["index"].tolist(), self.partners) if self.qcc else []
        if pairs:
            anchor_crops, partner_crops = crop_pairs(pairs, crop_counts)
            perturbed = tokens[anchor_crops] + self.alpha * tokens[partner_crops].detach()
            parts["qcc"] = qcc_consistency_loss(model.decode(perturbed), target[anchor_crops],
                                                pred_clean=pred[anchor_crops], mode=self.mode)
            items["qcc"] = len(anchor_crops)
            if self.weights.lambda_con > 0:
                parts["contrastive"], items["contrastive"] = self._contrastive(features, target, anchor_crops,
                                                                               partner_crops)
        if self.teacher is not None and self.weights.lambda_kd > 0 and labelled:
            teacher = torch.repeat_interleave(self.teacher[batch["index"]], crop_counts).to(device)
            parts["distill"] = distillation_loss(pred[~pseudo], teacher[~pseudo])
        loss, log = batch_loss(parts, items, self.weights, device)
        return loss, log | {"n_qcc_pairs": float(len(pairs))}

    def _contrastive(self, features: torch.Tensor, target: torch.Tensor, anchor_crops: torch.Tensor,
                     partner_crops: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The contrastive term and its item count (the anchors with a positive and a negative)."""
        partner_of = torch.full((len(features),), -1, dtype=torch.long)
        partner_of[anchor_crops.cpu()] = partner_crops.cpu()
        paired = partner_mask(partner_of).to(features.device)
        if self.rule == "aliasing":
            negatives, positives = paired, None
        else:
            far = (target[:, None] - target[None, :]).abs() > self.positive_gap
            negatives, positives = far & ~paired, paired
        anchors = int(contrastive_pairs(target, negatives, self.positive_gap, positives)[2].sum())
        return quality_contrastive_loss(features, target, negatives, temperature=self.temperature,
                                        positive_gap=self.positive_gap, positive_mask=positives), anchors


def crop_pairs(pairs: list[tuple[int, int]], counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop rows of (anchor, partner) image pairs in a batch: crop k of the anchor with crop k of its partner
    (as many as the one with fewer crops has)."""
    starts = torch.cumsum(counts, 0) - counts
    anchors, partners = [], []
    for a, p in pairs:
        k = int(min(counts[a], counts[p]))
        anchors.append(torch.arange(k) + starts[a])
        partners.append(torch.arange(k) + starts[p])
    return torch.cat(anchors), torch.cat(partners)
