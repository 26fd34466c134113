"""Per-batch training steps: the plain DEIQT step (teacher, baseline) and the QCC student step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from qfm.losses import (
    LossWeights,
    distillation_loss,
    partner_mask,
    qcc_consistency_loss,
    quality_contrastive_loss,
    quality_loss,
    total_loss,
)
from qfm.train.engine import to_device
from qfm.train.sampler import pairs_in_batch


def crop_targets(batch: dict, device: torch.device) -> torch.Tensor:
    """The image's MOS repeated for each of its crops."""
    return torch.repeat_interleave(batch["mos"], batch["n_crops"]).to(device)


def plain_step(model: nn.Module, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """SmoothL1 between every crop's prediction and its image's MOS."""
    pred = model(to_device(batch["image"], device))
    return total_loss({"quality": quality_loss(pred, crop_targets(batch, device))}, LossWeights())


class QccStep:
    """The student step: quality loss on labelled crops, weighted loss on pseudo-labelled crops, and, for
    each anchor whose SNM partner is in the batch (PairBatches puts it right after the anchor), the QCC
    consistency loss on T' = T + alpha * stop_grad(T_partner), crop k of the anchor with crop k of the
    partner. Optional quality-aware contrastive and distillation terms.
    """

    def __init__(self, partners: Mapping[int, Sequence[int]], is_pseudo: np.ndarray, weights: LossWeights, *,
                 qcc: bool = True, alpha: float = 0.5, mode: str = "label", temperature: float = 0.1,
                 teacher_scores: np.ndarray | None = None) -> None:
        self.partners = partners
        self.is_pseudo = torch.as_tensor(np.asarray(is_pseudo, dtype=bool))
        self.weights, self.qcc, self.alpha, self.mode, self.temperature = weights, qcc, alpha, mode, temperature
        self.teacher = None if teacher_scores is None else torch.as_tensor(teacher_scores, dtype=torch.float32)

    def __call__(self, model: nn.Module, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        counts = batch["n_crops"]
        target = crop_targets(batch, device)
        pseudo = torch.repeat_interleave(self.is_pseudo[batch["index"]], counts).to(device)
        tokens = model.encode(to_device(batch["image"], device))
        pred, features = model.decode(tokens, return_features=True)
        parts: dict[str, torch.Tensor] = {}
        if (~pseudo).any():
            parts["quality"] = quality_loss(pred[~pseudo], target[~pseudo])
        if pseudo.any() and self.weights.lambda_pl > 0:
            parts["pseudo"] = quality_loss(pred[pseudo], target[pseudo])
        pairs = pairs_in_batch(batch["index"].tolist(), self.partners) if self.qcc else []
        if pairs:
            anchor_crops, partner_crops = self._crop_pairs(pairs, counts)
            perturbed = tokens[anchor_crops] + self.alpha * tokens[partner_crops].detach()
            parts["qcc"] = qcc_consistency_loss(model.decode(perturbed), target[anchor_crops],
                                                pred_clean=pred[anchor_crops], mode=self.mode)
            if self.weights.lambda_con > 0:
                partner_of = torch.full((len(pred),), -1, dtype=torch.long, device=pred.device)
                partner_of[anchor_crops] = partner_crops
                parts["contrastive"] = quality_contrastive_loss(features, target, partner_mask(partner_of),
                                                                temperature=self.temperature)
        if self.teacher is not None and self.weights.lambda_kd > 0 and (~pseudo).any():
            teacher = torch.repeat_interleave(self.teacher[batch["index"]], counts).to(device)
            parts["distill"] = distillation_loss(pred[~pseudo], teacher[~pseudo])
        if "quality" not in parts and "pseudo" not in parts:
            parts["quality"] = quality_loss(pred, target)
        return total_loss(parts, self.weights)

    @staticmethod
    def _crop_pairs(pairs: list[tuple[int, int]], counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.cumsum(counts, 0) - counts
        anchors, partners = [], []
        for a, p in pairs:
            k = int(min(counts[a], counts[p]))
            anchors.append(torch.arange(k) + starts[a])
            partners.append(torch.arange(k) + starts[p])
        return torch.cat(anchors), torch.cat(partners)
