"""``dwml``: the dual-weighted metric loss of DWML, and ``dwml_rank``, a per-label ranking term beside it.

Jin, Lu, Zhu, Huo, "Deep learning based classification of multi-label chest X-ray images via
dual-weighted metric loss", Comput. Biol. Med. 157 (2023) 106683. It reads the cosine similarities
``m_ic = cos(z_i, q_c)`` between image embeddings and label prototypes (``extras['similarity']`` of
the ``prototype`` head; with the head's ``euclidean`` or ``dot`` metric, those scores instead) and weighs every (image, label) term at the disease-category level and at the
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
* entry weight ``u_ic`` (no gradient; ``entry_weight``): ``none`` (1) or ``focal``, the focal-style
  hardness of the sibling paper (Jin, Lu, Li, Wang, Multimedia Tools and Applications 2023,
  PMC10015533: hard samples up, easy ones down) [ours, the form]: ``u_ic ∝ |y_ic − p_ic|^γ`` (``gamma``,
  2), normalised to mean 1 over the batch's known entries so the loss keeps its scale; γ = 0 is ``none``;
* ``L = mean_i v_i · mean_c w_c u_ic ℓ_ic`` over known labels (an image with no known label drops out);
* ``bce_weight`` > 0 adds that much masked BCE on the head's logits ``κ_head m_ic + b_c`` (the only
  thing that trains the head's own κ and b; without it they keep their start values, which leaves
  per-label rankings, hence AUC, and validation-fitted thresholds unaffected).

``dwml_rank`` [ours]: a category-level term that ranks images against each other per label (what
macro AUC measures; ``dwml`` alone compares each score with fixed margins, never two images). For
label c with known positives P_c and known negatives N_c in the batch,

    R_c = mean_{i∈P_c, j∈N_c} softplus(κ (m_jc − m_ic + ρ))

(κ = ``scale``, 16; ρ = ``margin``, 0.1), and the term is the mean of R_c over the labels that have
both a positive and a negative in the batch (others drop out; every such label counts equally, as in
a macro AUC). Add it beside ``dwml`` in a recipe's ``loss``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CxrlabError, unknown
from ..output import Output
from ..registry import LOSSES
from .base import LossContext, LossTerm, masked_mean, target_and_mask

IMAGE_WEIGHTS = ("hardness", "inverse_positives", "none")
ENTRY_WEIGHTS = ("none", "focal")


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
                 category_power: float = 0.5, image_weight: str = "hardness", bce_weight: float = 0.0,
                 entry_weight: str = "none", gamma: float = 2.0):
        super().__init__(ctx)
        if not -1.0 <= margin_neg < margin_pos <= 1.0:
            raise CxrlabError(f"dwml: need -1 <= margin_neg < margin_pos <= 1, got margin_neg={margin_neg}, "
                              f"margin_pos={margin_pos}")
        if scale <= 0 or category_power < 0 or bce_weight < 0:
            raise CxrlabError(f"dwml: need scale > 0, category_power >= 0 and bce_weight >= 0, got "
                              f"scale={scale}, category_power={category_power}, bce_weight={bce_weight}")
        if image_weight not in IMAGE_WEIGHTS:
            raise unknown("dwml image_weight", image_weight, IMAGE_WEIGHTS)
        if entry_weight not in ENTRY_WEIGHTS:
            raise unknown("dwml entry_weight", str(entry_weight), ENTRY_WEIGHTS)
        if not gamma >= 0:
            raise CxrlabError(f"dwml: need gamma >= 0 (the focal entry weight's exponent), got gamma={gamma}")
        self.entry_weight, self.gamma = entry_weight, float(gamma)
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
        weighted = per_entry * self.category_weight.to(m.dtype) * self.entry_weights(m, target, mask)
        per_image = (weighted * mask).sum(1) / known.clamp_min(1.0)
        loss = masked_mean(self.image_weights(m, target, mask) * per_image, (known > 0).to(m.dtype))
        if self.bce_weight > 0:
            logits = output.logits.float()
            loss = loss + self.bce_weight * masked_mean(
                F.binary_cross_entropy_with_logits(logits, target, reduction="none"), mask)
        return loss

    def probability(self, m: torch.Tensor) -> torch.Tensor:
        """``p_ic = sigmoid(κ(m_ic − (δ⁺ + δ⁻)/2))``, the hardness weights' probability."""
        return torch.sigmoid(self.scale * (m - 0.5 * (self.margin_pos + self.margin_neg)))

    @torch.no_grad()
    def image_weights(self, m: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``v_i`` per image (B), detached."""
        if self.image_weight == "none":
            return torch.ones(len(m), dtype=m.dtype, device=m.device)
        if self.image_weight == "inverse_positives":
            return 1.0 / (target * mask).sum(1).clamp_min(1.0)
        return 1.0 + ((target - self.probability(m)).abs() * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    @torch.no_grad()
    def entry_weights(self, m: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``u_ic`` (B×L), detached: 1, or ``|y − p|^γ`` scaled to mean 1 over the known entries."""
        if self.entry_weight == "none":
            return torch.ones_like(m)
        hardness = (target - self.probability(m)).abs() ** self.gamma
        mean = (hardness * mask).sum() / mask.sum().clamp_min(1.0)
        # a batch where every known entry is already perfect (mean 0) keeps weight 1
        return hardness / mean if mean > 0 else torch.ones_like(m)


def ranking_loss(m: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, scale: float = 16.0,
                 margin: float = 0.1) -> torch.Tensor:
    """Mean over labels with a known positive and a known negative in the batch of
    ``mean_{i∈P_c, j∈N_c} softplus(scale (m_jc − m_ic + margin))``; 0 (with gradient) when none has both."""
    positive = (target > 0.5) & (mask > 0.5)
    negative = (target <= 0.5) & (mask > 0.5)
    # diff[i, j, c] = m_jc − m_ic + margin: image i as the positive, image j as the negative
    diff = m[None, :, :] - m[:, None, :] + margin
    pairs = (positive[:, None, :] & negative[None, :, :]).to(m.dtype)
    count = pairs.sum(dim=(0, 1))
    per_label = (F.softplus(scale * diff) * pairs).sum(dim=(0, 1)) / count.clamp_min(1.0)
    counted = (count > 0).to(m.dtype)
    return (per_label * counted).sum() / counted.sum().clamp_min(1.0)


@LOSSES.register("dwml_rank")
class DWMLRank(LossTerm):
    """Category-level ranking of images per label on the prototype head's scores (see the module
    docstring) [ours]; ``scale`` κ (16), ``margin`` ρ (0.1) in score units."""

    requires = frozenset({"similarity"})

    def __init__(self, ctx: LossContext | None = None, scale: float = 16.0, margin: float = 0.1):
        super().__init__(ctx)
        if not scale > 0 or not margin >= 0:
            raise CxrlabError(f"dwml_rank: need scale > 0 and margin >= 0, got scale={scale}, margin={margin}")
        self.scale, self.margin = float(scale), float(margin)

    def forward(self, output: Output, batch: dict) -> torch.Tensor:
        m = self.extras(output)["similarity"].float()
        target, mask = target_and_mask(batch, m)
        if m.shape != target.shape:
            raise CxrlabError(f"loss dwml_rank: similarity {tuple(m.shape)} does not match the targets "
                              f"{tuple(target.shape)}")
        return ranking_loss(m, target, mask, self.scale, self.margin)
