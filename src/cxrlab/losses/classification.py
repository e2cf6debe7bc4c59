"""Baseline multi-label classification losses: BCE, weighted BCE, focal, asymmetric (ASL).

Every term is masked: entries with ``mask == 0`` (unknown labels) contribute nothing, and the loss is
the mean over the known entries of the batch. All terms work on log-sigmoids (of fp32 logits under
autocast) so that large logits neither overflow nor lose the gradient (``log(sigmoid(x))`` computed
naively underflows).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CxrlabError
from ..registry import LOSSES
from .base import LabelLoss, LossContext, masked_mean


@LOSSES.register("bce")
class BCE(LabelLoss):
    """Binary cross-entropy per label, averaged over known entries (the CheXNet baseline; Rajpurkar et al.,
    2017, "CheXNet: Radiologist-Level Pneumonia Detection on Chest X-Rays with Deep Learning")."""

    def loss(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(F.binary_cross_entropy_with_logits(logits, target, reduction="none"), mask)


@LOSSES.register("weighted_bce")
class WeightedBCE(LabelLoss):
    """BCE with positives of label c weighted by ``neg_c / pos_c`` from the training split.

    Counters the rarity of findings (Wang et al., CVPR 2017, ChestX-ray8, use the same balancing).
    Weights are clamped to ``[1/max_weight, max_weight]`` so a label with a handful of positives
    cannot dominate; labels with no known positive get weight 1 (there is nothing to up-weight).
    Outside a recipe, give the counts as ``WeightedBCE(LossContext.from_targets(names, target, mask))``
    or the weights themselves as ``WeightedBCE(pos_weight=[...])`` (one per label, used as given).
    """

    def __init__(self, ctx: LossContext | None = None, max_weight: float = 100.0, pos_weight=None):
        super().__init__(ctx)
        if max_weight < 1:
            raise CxrlabError(f"weighted_bce: max_weight must be >= 1, got {max_weight}")
        if pos_weight is not None:
            weight = np.asarray(pos_weight, dtype=np.float64).reshape(-1)
            if not (np.isfinite(weight).all() and (weight > 0).all()):
                raise CxrlabError(f"weighted_bce: pos_weight must be finite and > 0, got {weight.tolist()}")
            if ctx is not None and len(weight) != ctx.num_labels:
                raise CxrlabError(f"weighted_bce: pos_weight has {len(weight)} values for {ctx.num_labels} labels")
        elif ctx is None:
            raise CxrlabError("weighted_bce needs the training labels' positive frequencies: pass "
                              "WeightedBCE(LossContext.from_targets(label_names, target, mask)) or the "
                              "per-label weights, WeightedBCE(pos_weight=[neg/pos, ...])")
        else:
            pos = np.asarray(ctx.pos_count, dtype=np.float64)
            neg = np.asarray(ctx.neg_count, dtype=np.float64)
            weight = np.where(pos > 0, neg / np.maximum(pos, 1.0), 1.0)
            weight = np.clip(weight, 1.0 / max_weight, max_weight)
        # Derived from the data each time the objective is built, so not part of the saved state.
        self.register_buffer("pos_weight", torch.tensor(weight, dtype=torch.float32), persistent=False)

    def loss(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none",
                                                  pos_weight=self.pos_weight.to(logits.dtype))
        return masked_mean(loss, mask)


@LOSSES.register("focal")
class Focal(LabelLoss):
    """Focal loss (Lin et al., ICCV 2017, "Focal Loss for Dense Object Detection"):
    ``−[α y (1−p)^γ log p + (1−α)(1−y) p^γ log(1−p)]``; down-weights easy examples so the many
    easy negatives of multi-label X-rays do not swamp the rare positives. Defaults are the paper's
    (γ = 2, α = 0.25); γ = 0, α = 0.5 is BCE / 2.
    """

    def __init__(self, ctx: LossContext | None = None, gamma: float = 2.0, alpha: float = 0.25):
        super().__init__(ctx)
        if gamma < 0 or not 0 <= alpha <= 1:
            raise CxrlabError(f"focal: need gamma >= 0 and 0 <= alpha <= 1, got gamma={gamma}, alpha={alpha}")
        self.gamma = float(gamma)
        self.alpha = float(alpha)

    def loss(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        log_p, log_q = F.logsigmoid(logits), F.logsigmoid(-logits)  # log p, log(1 − p)
        pos = self.alpha * target * torch.exp(self.gamma * log_q) * log_p
        neg = (1 - self.alpha) * (1 - target) * torch.exp(self.gamma * log_p) * log_q
        return masked_mean(-(pos + neg), mask)


@LOSSES.register("asl")
class ASL(LabelLoss):
    """Asymmetric loss (Ridnik et al., ICCV 2021, "Asymmetric Loss For Multi-Label Classification").

    ``−[y (1−p)^{γ⁺} log p + (1−y) p_m^{γ⁻} log(1−p_m)]`` with the shifted probability
    ``p_m = max(p − m, 0)``: negatives are focused harder than positives (γ⁻ > γ⁺) and very easy
    negatives (p < m) are discarded outright, which also rejects some mislabelled negatives.
    Defaults γ⁻ = 4, γ⁺ = 1, m = 0.05 (the paper's COCO setting has γ⁺ = 0). ``focus_no_grad``
    computes the focusing weights without gradient, as the reference code's
    ``disable_torch_grad_focal_loss`` does. With γ⁻ = γ⁺ = 0 and m = 0 this is BCE.
    """

    def __init__(self, ctx: LossContext | None = None, gamma_neg: float = 4.0, gamma_pos: float = 1.0,
                 margin: float = 0.05, focus_no_grad: bool = False):
        super().__init__(ctx)
        if gamma_neg < 0 or gamma_pos < 0 or not 0 <= margin < 1:
            raise CxrlabError(f"asl: need gamma_neg, gamma_pos >= 0 and 0 <= margin < 1, got "
                              f"gamma_neg={gamma_neg}, gamma_pos={gamma_pos}, margin={margin}")
        self.gamma_neg = float(gamma_neg)
        self.gamma_pos = float(gamma_pos)
        self.margin = float(margin)
        self.focus_no_grad = bool(focus_no_grad)

    def loss(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        log_p = F.logsigmoid(logits)
        if self.margin > 0:
            # 1 − p_m = min(1 − p + m, 1) >= m, so its log is finite without clamping to an epsilon.
            q_m = (torch.sigmoid(-logits) + self.margin).clamp(max=1.0)
            log_q_m = torch.log(q_m)
            p_m = 1.0 - q_m
        else:
            log_q_m = F.logsigmoid(-logits)
            p_m = torch.sigmoid(logits)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.focus_no_grad):
            w_pos = torch.exp(self.gamma_pos * F.logsigmoid(-logits))  # (1 − p)^γ⁺
            w_neg = _power(p_m, self.gamma_neg)
        loss = -(target * w_pos * log_p + (1 - target) * w_neg * log_q_m)
        return masked_mean(loss, mask)


def _power(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """``x ** gamma`` for x >= 0 with a finite gradient at x = 0 even when 0 < gamma < 1."""
    if gamma == 0:
        return torch.ones_like(x)
    if gamma >= 1:
        return x.pow(gamma)
    return torch.where(x > 0, x.clamp_min(1e-12).pow(gamma), torch.zeros_like(x))
