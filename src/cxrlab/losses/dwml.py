"""``dwml``: the dual-weighted metric loss of DWML.

Jin, Lu, Zhu, Huo, "Deep learning based classification of multi-label chest X-ray images via
dual-weighted metric loss", Comput. Biol. Med. 157 (2023) 106683. It reads the cosine similarities
``m_ic = cos(z_i, q_c)`` between image embeddings and label prototypes (``extras['similarity']`` of
the ``prototype`` head) and weighs every (image, label) term at the disease-category level and at the
image level. The form below is our reconstruction (spec ``dwml.md``, marked [ours] there):

* per (image, label): ``ℓ_ic = y softplus(κ(δ⁺ − m_ic)) + (1 − y) softplus(κ(m_ic − δ⁻))``: positives
  pulled above δ⁺ (0.5), negatives pushed below δ⁻ (0.1), κ = ``scale`` (16, fixed);
* category weight ``w_c ∝ (N / (C N_c⁺))^½`` normalised to mean 1 over the labels, from the training
  counts (:class:`LossContext`). ``N_c⁺/N`` is taken as label c's positive rate among its *known*
  entries (the same as the spec's counts when every label is known); a label with no known positive
  counts as having one. ``category_power`` sets the exponent (0 switches the weighting off);
* image weight ``v_i`` (no gradient): ``hardness`` ``1 + mean_c |y_ic − p_ic|`` over the known labels,
  ``inverse_positives`` ``1 / max(|P_i|, 1)``, or ``none``. [ours] ``p_ic = sigmoid(κ(m_ic − (δ⁺ + δ⁻)/2))``,
  the probability centred between the two margins: the spec's ``sigmoid(κ m_ic)`` would call a negative
  that sits exactly at its margin δ⁻ 83 % positive;
* ``L = mean_i v_i · mean_c w_c ℓ_ic`` over known labels (an image with no known label drops out);
* ``bce_weight`` > 0 adds that much masked BCE on the head's logits ``κ_head m_ic + b_c`` (the only
  thing that trains the head's own κ and b; without it they keep their start values, which leaves
  per-label rankings, hence AUC, and validation-fitted thresholds unaffected).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CxrlabError, unknown
from ..output import Output
from ..registry import LOSSES
from .base import LossContext, LossTerm, masked_mean

IMAGE_WEIGHTS = ("hardness", "inverse_positives", "none")


def category_weights(pos_count, neg_count, power: float = 0.5) -> np.ndarray:
    """``w_c ∝ (rate_c)^−power`` with ``rate_c`` = positives / known entries of label c, mean 1."""
    pos = np.asarray(pos_count, dtype=np.float64)
    known = pos + np.asarray(neg_count, dtype=np.float64)
    rate = np.maximum(pos, 1.0) / np.maximum(known, 1.0)
    w = rate ** (-float(power))
    return w / w.mean() if len(w) else w


@LOSSES.register("dwml")
class DWML(LossTerm):
    requires = frozenset({"similarity"})  # the prototype head's image-prototype cosines

    def __init__(self, ctx: LossContext, margin_pos: float = 0.5, margin_neg: float = 0.1, scale: float = 16.0,
                 category_power: float = 0.5, image_weight: str = "hardness", bce_weight: float = 0.0):
        super().__init__(ctx)
        if not -1.0 <= margin_neg < margin_pos <= 1.0:
            raise CxrlabError(f"dwml: need -1 <= margin_neg < margin_pos <= 1, got margin_neg={margin_neg}, "
                              f"margin_pos={margin_pos}")
        if scale <= 0 or category_power < 0 or bce_weight < 0:
            raise CxrlabError(f"dwml: need scale > 0, category_power >= 0 and bce_weight >= 0, got "
                              f"scale={scale}, category_power={category_power}, bce_weight={bce_weight}")
        if image_weight not in IMAGE_WEIGHTS:
            raise unknown("dwml image_weight", image_weight, IMAGE_WEIGHTS)
        self.margin_pos, self.margin_neg, self.scale = float(margin_pos), float(margin_neg), float(scale)
        self.image_weight, self.bce_weight = image_weight, float(bce_weight)
        weights = category_weights(ctx.pos_count, ctx.neg_count, category_power)
        # derived from the training counts each time the objective is built: not saved state
        self.register_buffer("category_weight", torch.tensor(weights, dtype=torch.float32), persistent=False)

    def forward(self, output: Output, batch: dict) -> torch.Tensor:
        m = self.extras(output)["similarity"].float()
        target = batch["target"].to(m.dtype)
        mask = batch["mask"].to(m.dtype) if "mask" in batch else torch.ones_like(target)
        if m.shape != target.shape:
            raise CxrlabError(f"loss dwml: similarity {tuple(m.shape)} does not match the targets {tuple(target.shape)}")
        k = self.scale
        per_entry = target * F.softplus(k * (self.margin_pos - m)) + (1 - target) * F.softplus(k * (m - self.margin_neg))
        known = mask.sum(1)
        per_image = (per_entry * self.category_weight.to(m.dtype) * mask).sum(1) / known.clamp_min(1.0)
        loss = masked_mean(self.image_weights(m, target, mask) * per_image, (known > 0).to(m.dtype))
        if self.bce_weight > 0:
            logits = output.logits.float()
            loss = loss + self.bce_weight * masked_mean(
                F.binary_cross_entropy_with_logits(logits, target, reduction="none"), mask)
        return loss

    @torch.no_grad()
    def image_weights(self, m: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``v_i`` per image (B), detached."""
        if self.image_weight == "none":
            return torch.ones(len(m), dtype=m.dtype, device=m.device)
        if self.image_weight == "inverse_positives":
            return 1.0 / (target * mask).sum(1).clamp_min(1.0)
        p = torch.sigmoid(self.scale * (m - 0.5 * (self.margin_pos + self.margin_neg)))
        return 1.0 + ((target - p).abs() * mask).sum(1) / mask.sum(1).clamp_min(1.0)
