"""LCL auxiliary losses: global/local label-correlation consistency and correlation-guided SupCon.

Zhang, Liang, Cao, Liu, Yang, Zaiane, "Label correlation guided discriminative label feature learning for
multi-label chest image classification", Computer Methods and Programs in Biomedicine 245 (2024) 108032.
The paper's total objective is ``L = L_cls + λ1 L_cons + λ2 L_supcon`` (λ1 = λ2 = 0.1 to start), e.g.
``loss: {lcl_branches: 1.0, lcl_consistency: 0.1, lcl_supcon: 0.1}``. The two auxiliary terms read the
extras of the ``lcl`` or ``label_query`` head (:mod:`cxrlab.models.heads.lcl`): ``label_features``
(B×C×d') and ``correlation`` (G, C×C, rows sum to 1); their exact forms are our reconstructions ([ours]
in the spec). ``lcl_branches`` is ``L_cls`` on a head with a global branch, as the group's GL-MLL trains
it: the classification loss on each branch's logits, summed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CxrlabError, unknown
from ..output import Output
from ..registry import LOSSES
from .base import LossContext, LossTerm, target_and_mask
from .classification import BCE, WeightedBCE

_EPS = 1e-8


_LABEL_EXTRAS = frozenset({"label_features", "correlation"})  # the lcl and label_query heads fill them


def _label_extras(term: LossTerm, output: Output) -> tuple[torch.Tensor, torch.Tensor]:
    extras = term.extras(output)  # fp32 under autocast
    feats, corr = extras["label_features"], extras["correlation"]
    if feats.ndim != 3 or corr.shape != (feats.shape[1], feats.shape[1]):
        raise CxrlabError(f"loss {type(term).__name__}: label_features must be B×C×d and correlation C×C, got "
                          f"{tuple(feats.shape)} and {tuple(corr.shape)}")
    return feats, corr.to(feats.dtype)


BRANCH_BASES = {"bce": BCE, "weighted_bce": WeightedBCE}


@LOSSES.register("lcl_branches")
class LCLBranches(LossTerm):
    """The classification loss on each branch of a head with a global branch, summed:
    ``base(global_logits) + base(label_logits)``, with ``base`` the ``bce`` or ``weighted_bce`` term
    (the same math and masking; default ``weighted_bce``, as GL-MLL's class-balanced BCE).

    GL-MLL (llt1836/GL-MLL, ``MyGCN.classifier_loss``) trains its global output ``fc(GAP F)`` and its
    label-branch output each with its weighted BCE and sums the two, so the global branch alone is held
    to the plain classifier's objective (a floor) while the label branch learns. Needs ``lcl`` (or
    ``label_query``) with ``global_branch: true``, which fills the ``global_logits`` and
    ``label_logits`` extras.
    """

    requires = frozenset({"global_logits", "label_logits"})

    def __init__(self, ctx: LossContext, base: str = "weighted_bce"):
        super().__init__(ctx)
        if base not in BRANCH_BASES:
            raise unknown("lcl_branches base", base, BRANCH_BASES)
        self.base = BRANCH_BASES[base](ctx)

    def forward(self, output: Output, batch: dict) -> torch.Tensor:
        missing = [k for k in ("global_logits", "label_logits") if k not in output.extras]
        if missing:
            raise CxrlabError("loss lcl_branches needs a head with a global branch (head lcl or label_query "
                              "with head_args global_branch: true); the model's output has no "
                              f"{', '.join(repr(k) for k in missing)} extra")
        total = 0.0
        for key in ("global_logits", "label_logits"):
            logits = output.extras[key].float()  # fp32 under autocast, as every classification term
            target, mask = target_and_mask(batch, logits)
            total = total + self.base.loss(logits, target, mask)
        return total


def local_correlation(label_features: torch.Tensor) -> torch.Tensor:
    """``S_i[c,c'] = |cos(v_ic, v_ic')|`` for every image, B×C×C (diagonal 1 unless a feature is 0)."""
    z = F.normalize(label_features, dim=-1, eps=_EPS)
    return (z @ z.transpose(1, 2)).abs()


@LOSSES.register("lcl_consistency")
class LCLConsistency(LossTerm):
    """Consistency between the global label correlation G and each image's local correlation S_i.

    ``form: frobenius`` (default): ``mean_i ||rownorm(S_i) − G||²_F`` (squared Frobenius norm, summed over
    the C×C entries, averaged over images). ``form: kl``: ``mean_i mean_c KL(G_c || rownorm(S_i)_c)``,
    the row-wise KL divergence from G (the target distribution) to the local correlation.
    ``detach_g`` (default True): no gradient into G (with the ``attention`` source G carries the current
    batch's self-attention gradient in training mode, with ``learned`` the parameter's).

    ``supervised: true`` [ours] adds ``supervised_weight ×`` a soft Dice loss between the raw S_i and the
    label co-occurrence ``y_i y_iᵀ`` over off-diagonal pairs of known labels: ``1 − (2ΣSY + 1)/(ΣS + ΣY + 1)``
    per image (smoothing 1), averaged over images with at least one known pair. The consistency part
    needs no labels; unknown labels never enter the supervised part.
    """

    requires = _LABEL_EXTRAS

    def __init__(self, ctx: LossContext, form: str = "frobenius", detach_g: bool = True,
                 supervised: bool = False, supervised_weight: float = 1.0):
        super().__init__(ctx)
        if form not in ("frobenius", "kl"):
            raise CxrlabError(f"lcl_consistency: form must be 'frobenius' or 'kl', got {form!r}")
        if supervised_weight < 0:
            raise CxrlabError(f"lcl_consistency: supervised_weight must be >= 0, got {supervised_weight}")
        self.form = form
        self.detach_g = bool(detach_g)
        self.supervised = bool(supervised)
        self.supervised_weight = float(supervised_weight)

    def forward(self, output: Output, batch: dict) -> torch.Tensor:
        feats, g = _label_extras(self, output)
        if self.detach_g:
            g = g.detach()
        s = local_correlation(feats)
        p = s / s.sum(-1, keepdim=True).clamp_min(_EPS)  # rownorm(S_i)
        if self.form == "frobenius":
            loss = (p - g).pow(2).sum(dim=(1, 2)).mean()
        else:
            kl = torch.xlogy(g, g) - g * torch.log(p.clamp_min(_EPS))  # 0·log 0 = 0
            loss = kl.sum(-1).mean()
        if self.supervised and self.supervised_weight > 0:
            loss = loss + self.supervised_weight * self._dice(s, batch)
        return loss

    @staticmethod
    def _dice(s: torch.Tensor, batch: dict) -> torch.Tensor:
        target, mask = target_and_mask(batch, s)
        c = s.shape[1]
        pairs = mask[:, :, None] * mask[:, None, :] * (1 - torch.eye(c, dtype=s.dtype, device=s.device))
        y = target[:, :, None] * target[:, None, :]
        inter = (s * y * pairs).sum(dim=(1, 2))
        total = (s * pairs).sum(dim=(1, 2)) + (y * pairs).sum(dim=(1, 2))
        dice = 1 - (2 * inter + 1) / (total + 1)
        has_pairs = (pairs.sum(dim=(1, 2)) > 0).to(s.dtype)
        return (dice * has_pairs).sum() / has_pairs.sum().clamp_min(1.0)


@LOSSES.register("lcl_supcon")
class LCLSupCon(LossTerm):
    """Label-correlation-guided multi-label supervised contrastive loss [ours, from the LCL spec].

    Anchors: the label features ``z_ic`` of labels known positive in image i, passed through this term's
    projection MLP (``projection`` > 0: ``Linear(in_dim, in_dim) → ReLU → Linear(in_dim, projection)``, as
    SupCon's projection head, Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020; it is part
    of the loss, trained in the objective's own parameter group and unused at inference; ``projection:
    0`` uses the head's label features directly) and L2-normalised. Positives of anchor (i, c): ``z_jc``,
    j ≠ i, known positive for the same label. Candidates (denominator): every known-positive label feature
    in the batch except the anchor itself; a candidate of label c' ≠ c is weighted by
    ``ω_cc' = 1 − G[c, c']`` (G detached), one of label c by 1, so strongly correlated labels are pushed
    apart less. Per anchor (SupCon "out" form, log-probability averaged over positives)::

        ℓ_ic = −1/|P| Σ_{p∈P} log( exp(z_ic·z_p/τ) / Σ_{k∈K} ω_k exp(z_ic·z_k/τ) )

    averaged over anchors with at least one positive; anchors without one are skipped, and a batch with
    no such anchor gives 0 (with a zero gradient, never NaN).

    Args: ``temperature`` τ (0.1); ``in_dim`` the head's label-feature size (512, the heads' default
    ``dim``); ``projection`` output size of the projection MLP (128; 0 = none).
    """

    requires = _LABEL_EXTRAS

    def __init__(self, ctx: LossContext, temperature: float = 0.1, in_dim: int = 512, projection: int = 128):
        super().__init__(ctx)
        if temperature <= 0:
            raise CxrlabError(f"lcl_supcon: temperature must be > 0, got {temperature}")
        if projection < 0 or (projection and in_dim < 1):
            raise CxrlabError(f"lcl_supcon: need projection >= 0 and in_dim >= 1, got {projection}, {in_dim}")
        self.temperature = float(temperature)
        self.in_dim = int(in_dim)
        self.projector = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True),
                                       nn.Linear(in_dim, projection)) if projection else None

    def forward(self, output: Output, batch: dict) -> torch.Tensor:
        feats, g = _label_extras(self, output)
        if self.projector is not None:
            if feats.shape[-1] != self.in_dim:
                raise CxrlabError(f"lcl_supcon: the label features have size {feats.shape[-1]} but in_dim is "
                                  f"{self.in_dim}; set the loss's in_dim to the head's dim")
            feats = self.projector(feats.to(self.projector[0].weight.dtype)).to(feats.dtype)
        target, mask = target_and_mask(batch, feats)
        return supcon(feats, g.detach(), target * mask, self.temperature)


def supcon(features: torch.Tensor, g: torch.Tensor, positive: torch.Tensor, temperature: float) -> torch.Tensor:
    """The weighted multi-label SupCon of :class:`LCLSupCon` on given (already projected) features.

    ``features`` B×C×d (L2-normalised here), ``g`` C×C, ``positive`` B×C (1 = known positive).
    """
    b, c, _ = features.shape
    keep = positive.reshape(-1) > 0.5
    z = F.normalize(features, dim=-1, eps=_EPS).reshape(b * c, -1)[keep]  # N×d, the positive label features
    label = torch.arange(c, device=features.device).repeat(b)[keep]
    image = torch.arange(b, device=features.device).repeat_interleave(c)[keep]
    n = z.shape[0]
    same_label = label[:, None] == label[None, :]
    self_pair = torch.eye(n, dtype=torch.bool, device=features.device)
    pos = same_label & (image[:, None] != image[None, :])
    n_pos = pos.sum(1)
    anchors = n_pos > 0
    if not bool(anchors.any()):
        return features.sum() * 0.0
    # rows: anchors only (each has a same-label partner of weight 1, so every log-sum-exp is finite)
    label_a, pos, n_pos, self_pair = label[anchors], pos[anchors], n_pos[anchors], self_pair[anchors]
    weight = (1 - g[label_a][:, label]).clamp_min(0.0)
    weight = torch.where(label_a[:, None] == label[None, :], torch.ones_like(weight), weight)
    logits = z[anchors] @ z.T / temperature
    log_weight = torch.log(weight).masked_fill(self_pair, float("-inf"))  # ω = 0 drops a candidate
    log_prob = logits - torch.logsumexp(logits + log_weight, dim=1, keepdim=True)
    return (-(log_prob * pos).sum(1) / n_pos).mean()
