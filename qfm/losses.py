"""Training losses: quality (SmoothL1, as DEIQT), QCC consistency, quality-aware contrastive, distillation.

The student's objective (docs: method) is

    L = L_q + lambda_qcc * L_cons + lambda_con * L_contrastive + lambda_pl * L_q(pseudo) + lambda_kd * L_distill

``total_loss`` combines the parts a batch has with ``LossWeights``; under data-parallel ranks
``global_share`` normalises each part by its item count over all ranks (``part_statistics``, summed), so that
the averaged gradient is that of the global batch; ``check_finite`` stops training with a message naming the
step and the images when a loss turns NaN/inf.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from qfm.errors import ConfigError, QfmError

QCC_MODES = ("label", "clean", "both")
#: part name in ``total_loss`` -> the LossWeights field that scales it (None: weight 1).
PART_WEIGHTS = {"quality": None, "qcc": "lambda_qcc", "contrastive": "lambda_con", "pseudo": "lambda_pl",
                "distill": "lambda_kd"}


class NonFiniteLossError(QfmError):
    """A loss became NaN or inf during training."""


def _flat(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 1:
        raise ConfigError(f"{name} must have shape (B,) or (B, 1), got {tuple(x.shape)}")
    return x


def _weighted_smooth_l1(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, beta: float,
                        names: tuple[str, str]) -> torch.Tensor:
    pred, target = _flat(pred, names[0]), _flat(target, names[1])
    if pred.shape != target.shape:
        raise ConfigError(f"{names[0]} has {pred.shape[0]} items but {names[1]} has {target.shape[0]}")
    if pred.numel() == 0:
        raise ConfigError(f"{names[0]} is empty: a loss needs at least one sample")
    if not beta > 0:
        raise ConfigError(f"SmoothL1 beta must be > 0, got {beta}")
    dtype = torch.promote_types(pred.dtype, torch.float32)  # fp16/bf16 predictions (AMP): loss in fp32
    pred = pred.to(dtype)
    per_sample = F.smooth_l1_loss(pred, target.to(device=pred.device, dtype=dtype), reduction="none", beta=beta)
    if weight is None:
        return per_sample.mean()
    weight = _flat(torch.as_tensor(weight, dtype=pred.dtype, device=pred.device), "weight")
    if weight.shape != pred.shape:
        raise ConfigError(f"weight has {weight.shape[0]} items but {names[0]} has {pred.shape[0]}")
    if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
        raise ConfigError("per-sample loss weights must be finite and >= 0")
    return (weight.detach() * per_sample).mean()


def quality_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                 beta: float = 1.0) -> torch.Tensor:
    """SmoothL1 between predictions and MOS (DEIQT: ``torch.nn.SmoothL1Loss()``, beta 1.0, batch mean).

    With ``weight`` (one value >= 0 per sample, e.g. a pseudo-label's confidence) the loss is
    mean_i(w_i * SmoothL1_i): the batch mean, so a uniform weight of 0.5 halves the loss.
    """
    return _weighted_smooth_l1(pred, target, weight, beta, ("pred", "target"))


def qcc_consistency_loss(pred_perturbed: torch.Tensor, target: torch.Tensor,
                         pred_clean: torch.Tensor | None = None, mode: str = "label",
                         weight: torch.Tensor | None = None, beta: float = 1.0) -> torch.Tensor:
    """QCC consistency: the prediction on perturbed tokens T' = T + alpha * N must stay the anchor's quality.

    mode 'label': SmoothL1(pred_perturbed, target); 'clean': SmoothL1(pred_perturbed, stop_grad(pred_clean));
    'both': the mean of the two (so lambda_qcc keeps its scale). Gradients flow only through
    ``pred_perturbed``; ``weight`` is as in ``quality_loss``.
    """
    if mode not in QCC_MODES:
        raise ConfigError(f"qcc mode must be one of {QCC_MODES}, got {mode!r}")
    if mode in ("clean", "both") and pred_clean is None:
        raise ConfigError(f"qcc mode {mode!r} needs pred_clean (the prediction on the unperturbed tokens)")
    terms = []
    if mode in ("label", "both"):
        terms.append(_weighted_smooth_l1(pred_perturbed, target, weight, beta, ("pred_perturbed", "target")))
    if mode in ("clean", "both"):
        terms.append(_weighted_smooth_l1(pred_perturbed, pred_clean.detach(), weight, beta,
                                         ("pred_perturbed", "pred_clean")))
    return terms[0] if len(terms) == 1 else 0.5 * (terms[0] + terms[1])


def partner_mask(partner_index: torch.Tensor, n: int | None = None, symmetric: bool = True) -> torch.Tensor:
    """The (N, N) negatives mask (on the CPU) from one partner index per row (-1 = no partner).

    ``partner_index[i] = j`` marks j as i's SNM aliasing partner; with ``symmetric`` i is j's negative too
    (aliasing — close features, different quality — is a symmetric relation).
    """
    idx = torch.as_tensor(partner_index, dtype=torch.long).cpu()
    if idx.dim() != 1:
        raise ConfigError(f"partner_index must be 1-D, got shape {tuple(idx.shape)}")
    n = idx.shape[0] if n is None else n
    if idx.shape[0] != n:
        raise ConfigError(f"partner_index has {idx.shape[0]} entries for a batch of {n}")
    bad = (idx < -1) | (idx >= n) | (idx == torch.arange(n))
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ConfigError(f"partner_index[{i}] = {int(idx[i])} is not another row of the batch (0..{n - 1}) or -1")
    mask = torch.zeros(n, n, dtype=torch.bool)
    rows = torch.nonzero(idx >= 0).flatten()
    mask[rows, idx[rows]] = True
    if symmetric:
        mask |= mask.T.clone()
    return mask


def contrastive_pairs(quality: torch.Tensor, negative_mask: torch.Tensor, positive_gap: float,
                      positive_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positives, negatives, valid anchors) for ``quality_contrastive_loss``.

    positives[i, j]: j != i, j is not i's negative, and |q_i - q_j| <= positive_gap or positive_mask[i, j]
    (pairs known to share quality, e.g. SNM semantic partners); negatives = the mask as given (diagonal
    cleared); an anchor is valid when it has at least one of each.
    """
    q = _flat(quality, "quality")
    n = q.shape[0]
    neg = torch.as_tensor(negative_mask, dtype=torch.bool, device=q.device)
    if neg.shape != (n, n):
        raise ConfigError(f"negative_mask must have shape ({n}, {n}) for {n} samples, got {tuple(neg.shape)}")
    if not positive_gap >= 0:
        raise ConfigError(f"positive_gap must be >= 0, got {positive_gap}")
    eye = torch.eye(n, dtype=torch.bool, device=q.device)
    neg = neg & ~eye
    pos = (q[:, None] - q[None, :]).abs() <= positive_gap
    if positive_mask is not None:
        extra = torch.as_tensor(positive_mask, dtype=torch.bool, device=q.device)
        if extra.shape != (n, n):
            raise ConfigError(f"positive_mask must have shape ({n}, {n}) for {n} samples, got {tuple(extra.shape)}")
        pos = pos | extra
    pos = pos & ~eye & ~neg
    valid = pos.any(dim=1) & neg.any(dim=1)
    return pos, neg, valid


def quality_contrastive_loss(features: torch.Tensor, quality: torch.Tensor, negative_mask: torch.Tensor,
                             temperature: float = 0.1, positive_gap: float = 0.05,
                             positive_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Quality-aware InfoNCE on L2-normalised projected features.

    With s_ij the cosine similarity of rows i and j divided by ``temperature``, P_i and N_i from
    ``contrastive_pairs`` (positives: quality within ``positive_gap`` or marked in ``positive_mask``;
    negatives: ``negative_mask``, an (N, N) bool mask, e.g. the SNM aliasing partners from ``partner_mask``):

        l_i = mean_{p in P_i} -log( exp(s_ip) / (exp(s_ip) + sum_{n in N_i} exp(s_in)) )

    and the loss is the mean of l_i over anchors that have at least one positive and one negative; it is 0
    (still attached to the graph) when no anchor has both — ``contrastive_pairs`` tells how many did.
    """
    if not temperature > 0:
        raise ConfigError(f"contrastive temperature must be > 0, got {temperature}")
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ConfigError(f"features must be a (N, D) tensor, got {getattr(features, 'shape', type(features))}")
    q = _flat(quality, "quality").to(features.device)
    if q.shape[0] != features.shape[0]:
        raise ConfigError(f"features has {features.shape[0]} rows but quality has {q.shape[0]}")
    pos, neg, valid = contrastive_pairs(q, torch.as_tensor(negative_mask, device=features.device), positive_gap,
                                        positive_mask)
    if not bool(valid.any()):
        return features.sum() * 0.0
    z = F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=1)
    logits = (z @ z.T) / temperature
    logits, pos, neg = logits[valid], pos[valid], neg[valid]
    neg_lse = torch.logsumexp(logits.masked_fill(~neg, float("-inf")), dim=1, keepdim=True)
    # -log(e^a / (e^a + e^b)) = softplus(b - a), with a = s_ip and b = logsumexp over negatives
    per_pair = F.softplus(neg_lse - logits)
    per_anchor = (per_pair * pos).sum(dim=1) / pos.sum(dim=1)
    return per_anchor.mean()


def distillation_loss(student_pred: torch.Tensor, teacher_pred: torch.Tensor,
                      weight: torch.Tensor | None = None, beta: float = 1.0) -> torch.Tensor:
    """SmoothL1 from the student's predictions to the frozen teacher's (detached: no gradient to the teacher)."""
    return _weighted_smooth_l1(student_pred, teacher_pred.detach(), weight, beta, ("student_pred", "teacher_pred"))


@dataclass(frozen=True)
class LossWeights:
    """The lambdas of the student objective; 0 switches a term off. params.yaml sets the values used."""

    lambda_qcc: float = 1.0
    lambda_con: float = 0.0
    lambda_pl: float = 1.0
    lambda_kd: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"loss weight {f.name} must be a finite number >= 0, got {value!r}")

    @classmethod
    def from_dict(cls, values: Mapping) -> LossWeights:
        """From a params mapping; unknown keys are an error naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown loss weight(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def total_loss(parts: Mapping[str, torch.Tensor], weights: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the loss parts a batch has, and floats for logging.

    ``parts`` keys: quality (weight 1), qcc, contrastive, pseudo, distill (weights from ``LossWeights``).
    A part whose lambda is 0 is logged but not added. The log has ``loss`` (the total) and ``loss_<part>``
    (each part before weighting).
    """
    unknown = sorted(set(parts) - set(PART_WEIGHTS))
    if unknown:
        raise ConfigError(f"unknown loss part(s) {unknown}; known: {list(PART_WEIGHTS)}")
    total: torch.Tensor | None = None
    log: dict[str, float] = {}
    for name, value in parts.items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ConfigError(f"loss part '{name}' must be a scalar tensor, got {getattr(value, 'shape', value)!r}")
        log[f"loss_{name}"] = float(value.detach())
        field_name = PART_WEIGHTS[name]
        lam = 1.0 if field_name is None else getattr(weights, field_name)
        if lam == 0:
            continue
        term = value.reshape(()) * lam
        total = term if total is None else total + term
    if total is None:
        raise ConfigError(f"no loss part contributes to the total (parts {sorted(parts)}, weights "
                          f"{weights.as_dict()}): give the quality loss or a part with a non-zero lambda")
    log["loss"] = float(total.detach())
    return total, log


#: What each rank contributes per part in ``part_statistics``: whether it has the part, its item count, and the
#: sum of its items' losses (mean x count).
STATISTICS_PER_PART = 3


def part_statistics(parts: Mapping[str, torch.Tensor], counts: Mapping[str, int]) -> list[float]:
    """This rank's [present, count, sum] for every part of PART_WEIGHTS (zeros for a part it lacks): summed over
    the ranks, they give each part's global item count and its mean over the global batch.

    ``counts[name]`` is the number of items the part ``parts[name]`` is the mean over (crops for the quality,
    pseudo-label, distillation and QCC terms; valid anchors for the contrastive term)."""
    missing = sorted(set(parts) - set(counts))
    if missing:
        raise ConfigError(f"loss part(s) {missing} have no item count")
    values: list[float] = []
    for name in PART_WEIGHTS:
        if name in parts:
            values += [1.0, float(counts[name]), float(parts[name].detach()) * counts[name]]
        else:
            values += [0.0, 0.0, 0.0]
    return values


def global_share(parts: Mapping[str, torch.Tensor], counts: Mapping[str, int], totals: Sequence[float],
                 weights: LossWeights, world: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss one of `world` data-parallel ranks back-propagates, and the log of the global batch.

    Each part is a mean over this rank's ``counts[name]`` items; ``totals`` is ``part_statistics`` summed over
    the ranks. Every part is rescaled to ``world * (sum over this rank's items) / (global count)``, so that the
    gradient DDP averages over the ranks is the gradient of each part's mean over the whole global batch, as one
    process computes it: a rank without QCC pairs or pseudo-labelled images no longer dilutes the term of the
    ranks that have them. The log holds each part's global mean and the weighted total (as ``total_loss``), the
    same on every rank."""
    if len(totals) != STATISTICS_PER_PART * len(PART_WEIGHTS):
        raise ConfigError(f"totals must hold {STATISTICS_PER_PART} values per loss part ({len(PART_WEIGHTS)} parts), "
                          f"got {len(totals)}")
    log: dict[str, float] = {}
    total = 0.0
    scaled: dict[str, torch.Tensor] = {}
    for n, name in enumerate(PART_WEIGHTS):
        present, count, summed = totals[STATISTICS_PER_PART * n:STATISTICS_PER_PART * (n + 1)]
        if present > 0:
            log[f"loss_{name}"] = summed / count if count > 0 else 0.0
            field_name = PART_WEIGHTS[name]
            total += log[f"loss_{name}"] * (1.0 if field_name is None else getattr(weights, field_name))
        if name in parts:
            scaled[name] = parts[name] * (world * counts[name] / count if count > 0 else 0.0)
    loss, _ = total_loss(scaled, weights)
    return loss, log | {"loss": total}


def check_finite(loss: torch.Tensor, step: int, batch_ids: Sequence | None = None,
                 parts: Mapping[str, float] | None = None) -> None:
    """Raise NonFiniteLossError naming the step, the batch's image ids and the non-finite parts."""
    value = float(loss.detach().float().sum()) if isinstance(loss, torch.Tensor) else float(loss)
    if math.isfinite(value):
        return
    ids = [str(i) for i in (batch_ids if batch_ids is not None else [])]
    shown = ", ".join(ids[:20]) + (f", … ({len(ids)} in all)" if len(ids) > 20 else "")
    bad_parts = [f"{k}={v}" for k, v in (parts or {}).items() if not math.isfinite(float(v))]
    raise NonFiniteLossError(
        f"loss is {value} at step {step}"
        + (f"; batch images: {shown}" if ids else "; batch images: (not given)")
        + (f"; non-finite parts: {', '.join(bad_parts)}" if bad_parts else "")
        + ". Lower the learning rate or lengthen the warm-up, keep gradient clipping on, "
          "and check those images and their scores."
    )
