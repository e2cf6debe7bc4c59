"""Loss terms of MPC for single-positive multi-label chest X-ray classification.

Xiao, Li, Lin, Zhu, Yuan, Feng, Sheng. "Multi-Label Chest X-Ray Image Classification With Single
Positive Labels." IEEE Transactions on Medical Imaging 43(12):4404–4418, 2024.

``L = L_obs + λ1 L_IPC + λ2 L_FPC + λ3 L_BTC`` — each λ is the term's weight in the recipe's ``loss``
section (0 or absent = that part off, for the ablation). The pseudo-labels come from the ``mpc``
regime (:mod:`cxrlab.regimes.mpc`), which puts them into the Output's extras:

  ``pseudo_target`` B×L  the observed label where known, else the pseudo-label (1 / 0)
  ``pseudo_mask``   B×L  1 where known or confidently pseudo-labelled, 0 where ignored
  ``strong_logits`` B×L  logits of the strongly augmented view (IPC); ``Output.logits`` is the weak
                         view's, which ``spml_observed`` scores (FixMatch convention: the labelled
                         loss on the weak view; training it on the strong view cost 0.04-0.08 macro
                         AUC on our synthetic SPML task)
  ``fpc_logits``    B×L  head logits of the channel-dropped weak-view feature map (FPC)
  ``btc_logits``    B×L  head logits of the batch-Transformer-mixed feature map (BTC)

The observed labels always win over pseudo-labels: every term re-applies ``batch['target']`` where
``batch['mask']`` is 1, whatever the extras say.

Design decisions [ours; the spec's "Design" section]:
  * ``spml_observed``: BCE on the known entries (−log p on the observed positive) plus an optional weak
    "assume negative" term ``neg_weight · mean_unknown(−log(1 − p))`` (default 0). Each part is a
    mean over its own entries, so ``neg_weight = 1`` is WAN up to a constant factor.
  * IPC and FPC score *unknown* entries only (the known ones are ``spml_observed``'s job); with no
    confident pseudo-label they are exactly 0.
  * BTC is supervised by the observed labels *and* the pseudo-labels (every entry of
    ``pseudo_mask``), like the plain branch is by ``spml_observed`` + IPC together.
  * ``reduction`` of IPC / FPC: ``"all"`` (default) sums the BCE over the confidently pseudo-labelled
    unknown entries and divides by the number of *unknown* entries, as FixMatch (Sohn et al., NeurIPS
    2020) divides by all unlabelled samples: a handful of confident pseudo-labels then weighs little.
    ``"selected"`` is the plain masked mean over the pseudo-labelled entries; on our synthetic SPML
    task it let early, wrong pseudo-positives dominate (pseudo-positive precision ≈ base rate).
    BTC defaults to ``"selected"`` (mean over known + pseudo-labelled entries, ``"all"``: over B×C).
  * ``warmup_epochs`` of IPC / FPC / BTC (default 0): the term is 0 for the first epochs, so that
    pseudo-labels only supervise once the model has learnt from the observed labels alone.
  * ``spml_observed`` spares entries the regime pseudo-labelled *positive* from the assume-negative
    term (``spare_pseudo_pos``, default True), so the two terms do not pull the same entry apart.
    With ``neg_weight = 0`` (the default) nothing ever pushes a probability down except pseudo-
    negatives, and on our synthetic task every unknown drifted to pseudo-positive (collapse):
    recipes should set ``neg_weight`` (1.0 worked there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import CxrlabError
from ..output import Output
from ..registry import LOSSES
from .base import LossContext, LossTerm, masked_mean, target_and_mask

_REDUCTIONS = ("selected", "all")


def _known(batch: dict, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    target, mask = target_and_mask(batch, like)
    return target, mask > 0.5


_PSEUDO = frozenset({"pseudo_target", "pseudo_mask"})  # the regime's extras every consistency term reads


def _pseudo(term: str, extras: dict, batch: dict, like: torch.Tensor):
    """Targets (observed label where known, else pseudo-label) and the known / pseudo-labelled masks."""
    pseudo_target = extras["pseudo_target"].to(like.dtype)
    pseudo_mask = extras["pseudo_mask"] > 0.5
    target, known = _known(batch, like)
    if pseudo_target.shape != like.shape:
        raise CxrlabError(f"loss {term!r}: pseudo_target has shape {tuple(pseudo_target.shape)}, "
                          f"logits {tuple(like.shape)}")
    merged = torch.where(known, target, pseudo_target)  # the observed label is never overwritten
    return merged, known, pseudo_mask & ~known


def _reduce(values: torch.Tensor, selected: torch.Tensor, eligible: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "selected":
        return masked_mean(values, selected)
    return (values * selected.to(values.dtype)).sum() / eligible.sum().clamp_min(1).to(values.dtype)


def _check_reduction(term: str, reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise CxrlabError(f"{term}: unknown reduction {reduction!r} (valid: {', '.join(_REDUCTIONS)})")
    return reduction


class _Warmup:
    """Epoch counter of a term that stays off for its first ``epochs`` epochs."""

    def __init__(self, term: str, epochs: int):
        if int(epochs) != epochs or epochs < 0:
            raise CxrlabError(f"{term}: warmup_epochs must be a whole number >= 0, got {epochs}")
        self.epochs, self.epoch = int(epochs), 0

    @property
    def waiting(self) -> bool:
        return self.epoch < self.epochs


def _float(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


@LOSSES.register("spml_observed")
class SpmlObserved(LossTerm):
    """MPC's observed-label loss ``L_obs``: BCE over the known entries (in SPML −log p on the one
    observed positive) + ``neg_weight ·`` mean over unknown entries of ``−log(1 − p)`` (the weak
    "assume negative" term [ours]; with ``spare_pseudo_pos`` the entries the ``mpc`` regime
    pseudo-labelled positive are left out of it). Works under any regime; without the ``mpc``
    regime there is nothing to spare. ``neg_weight = 1`` is WAN up to a constant factor; the default
    0 leaves nothing to push probabilities down but pseudo-negatives (see the module notes)."""

    def __init__(self, ctx: LossContext, neg_weight: float = 0.0, spare_pseudo_pos: bool = True):
        super().__init__(ctx)
        if neg_weight < 0:
            raise CxrlabError(f"spml_observed: neg_weight must be >= 0, got {neg_weight}")
        self.neg_weight = float(neg_weight)
        self.spare_pseudo_pos = bool(spare_pseudo_pos)

    def forward(self, output: Output, batch: dict) -> torch.Tensor:
        logits = _float(output.logits)
        target, known = _known(batch, logits)
        loss = masked_mean(F.binary_cross_entropy_with_logits(logits, target, reduction="none"), known)
        if self.neg_weight > 0:
            assumed = ~known
            if self.spare_pseudo_pos and "pseudo_target" in output.extras and "pseudo_mask" in output.extras:
                pseudo_pos = (output.extras["pseudo_target"] > 0.5) & (output.extras["pseudo_mask"] > 0.5)
                assumed = assumed & ~pseudo_pos
            loss = loss + self.neg_weight * masked_mean(-F.logsigmoid(-logits), assumed)
        return loss


@LOSSES.register("mpc_ipc")
class ImagePerturbationConsistency(LossTerm):
    """IPC: BCE of the strong-view logits (``extras['strong_logits']``) against the weak-view
    pseudo-labels on the confidently pseudo-labelled unknown entries."""

    name = "mpc_ipc"
    key = "strong_logits"
    requires = _PSEUDO | {key}

    def __init__(self, ctx: LossContext, reduction: str = "all", warmup_epochs: int = 0):
        super().__init__(ctx)
        self.reduction = _check_reduction(self.name, reduction)
        self.warmup = _Warmup(self.name, warmup_epochs)

    def on_epoch_start(self, epoch: int) -> None:
        self.warmup.epoch = epoch

    def forward(self, output: Output, batch: dict) -> torch.Tensor:
        extras = self.extras(output)
        logits = extras[self.key]
        if self.warmup.waiting:
            return logits.sum() * 0.0
        target, known, pseudo = _pseudo(self.name, extras, batch, logits)
        values = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return _reduce(values, pseudo, ~known, self.reduction)


@LOSSES.register("mpc_fpc")
class FeaturePerturbationConsistency(ImagePerturbationConsistency):
    """FPC: the same pseudo-labels supervise the head's logits on the channel-dropped weak-view
    feature map (``extras['fpc_logits']``)."""

    name = "mpc_fpc"
    key = "fpc_logits"  # regime.args fpc: true
    requires = _PSEUDO | {key}


@LOSSES.register("mpc_btc")
class BatchTransformerCorrelation(LossTerm):
    """BTC: BCE of the batch-Transformer branch's logits (``extras['btc_logits']``) against the
    observed labels and the pseudo-labels (every known or confidently pseudo-labelled entry)."""

    name = "mpc_btc"
    requires = _PSEUDO | {"btc_logits"}  # regime.args btc: true

    def __init__(self, ctx: LossContext, reduction: str = "selected", warmup_epochs: int = 0):
        super().__init__(ctx)
        self.reduction = _check_reduction("mpc_btc", reduction)
        self.warmup = _Warmup(self.name, warmup_epochs)

    def on_epoch_start(self, epoch: int) -> None:
        self.warmup.epoch = epoch

    def forward(self, output: Output, batch: dict) -> torch.Tensor:
        extras = self.extras(output)
        logits = extras["btc_logits"]
        if self.warmup.waiting:
            return logits.sum() * 0.0
        target, known, pseudo = _pseudo(self.name, extras, batch, logits)
        values = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return _reduce(values, known | pseudo, torch.ones_like(known), self.reduction)
