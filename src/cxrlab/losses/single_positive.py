"""Single-positive multi-label (SPML) baseline losses: AN, AN-LS, WAN, EPR, ROLE, LL-R, LL-Ct, LL-Cp.

References
  * Cole, Mac Aodha, Lorieul, Perona, Morris, Jojic. "Multi-Label Learning from Single Positive
    Labels." CVPR 2021 — AN, AN-LS, WAN, EPR, ROLE.
  * Kim, Kim, Lee, Hwang, Cho. "Large Loss Matters in Weakly Supervised Multi-Label
    Classification." CVPR 2022 — LL-R, LL-Ct, LL-Cp.

Conventions (the same for every term here):
  * "observed positive" = ``target == 1 and mask == 1``; "known negative" = ``target == 0 and
    mask == 1`` (absent in pure SPML, handled for partial labels); "unknown" = ``mask == 0``.
  * Every term is the mean over the B×C entries of the batch (as both reference codes average their
    loss matrices), plus a regulariser where the method has one.
  * Losses are computed from logits with log-sigmoids (exact, finite for any logit); the reference
    codes use ``−log(p + 1e-5)``, which differs only for saturated probabilities.

Where we depart from the papers / reference code ([ours]):
  * WAN and EPR with *known* negatives (partial labels): known negatives keep full weight (WAN) or
    enter as ordinary BCE negatives (EPR); the papers only have observed positives.
  * ROLE: observed positives (negatives) of the label matrix are *fixed* at 0.995 (0.005) rather
    than initialised there and trained; the label-estimator's own "observed positive" term is then a
    constant and is left out.
  * LL-*: exactly ``k = ceil(share · B · C)`` entries (capped at the number of unknown entries) are
    modified, picked by ``topk`` among unknown entries only; the reference code modifies every entry
    whose loss ties the k-th value, and can touch observed entries when k exceeds the unknowns.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CxrlabError
from ..output import Output
from ..registry import LOSSES
from .base import LossContext, LossTerm, float_logits, target_and_mask


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _spml_parts(output: Output, batch: dict):
    """Float logits and the boolean masks: observed positive, known negative, unknown."""
    logits = float_logits(output)
    target, mask = target_and_mask(batch, logits)
    known = mask > 0.5
    pos = known & (target > 0.5)
    return logits, pos, known & ~pos, ~known


def _neg_log_p(logits: torch.Tensor) -> torch.Tensor:
    """−log σ(x), exact for any x."""
    return -F.logsigmoid(logits)


def _neg_log_q(logits: torch.Tensor) -> torch.Tensor:
    """−log(1 − σ(x)), exact for any x."""
    return -F.logsigmoid(-logits)


def _expected_positive_reg(probs: torch.Tensor, k: float) -> torch.Tensor:
    """EPR regulariser ``(mean_i Σ_c p_ic − k)² / C²`` (Cole et al., eq. for L_EPR, squared norm)."""
    return (probs.sum(1).mean() - k) ** 2 / probs.shape[1] ** 2


def _batch_index(term: str, batch: dict, n_train: int, device) -> torch.Tensor:
    if "index" not in batch:
        raise CxrlabError(f"loss {term!r} keeps per-image state and needs batch['index'] (the row of each image "
                          f"in the training set); the data pipeline provides it for training batches")
    index = torch.as_tensor(batch["index"], device=device).long()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n_train):
        raise CxrlabError(f"loss {term!r}: batch['index'] out of range [0, {n_train}) "
                          f"(got {int(index.min())}..{int(index.max())}); was the loss built for this training set?")
    return index


@LOSSES.register("an")
class AssumeNegative(LossTerm):
    """AN: every unknown label is taken as negative; BCE averaged over the B×C entries."""

    def forward(self, output: Output, batch: dict) -> torch.Tensor:
        logits, pos, _, _ = _spml_parts(output, batch)
        return F.binary_cross_entropy_with_logits(logits, pos.to(logits.dtype))


@LOSSES.register("an_ls")
class AssumeNegativeLabelSmoothing(LossTerm):
    """AN-LS: AN with label smoothing, targets ``1 − ε`` for positives and ``ε`` for (assumed)
    negatives (Cole et al. use ε = 0.1): ``(1−ε)·(−log p) + ε·(−log(1−p))`` on positives and the
    mirror image on negatives."""

    def __init__(self, ctx: LossContext, epsilon: float = 0.1):
        super().__init__(ctx)
        if not 0 <= epsilon < 0.5:
            raise CxrlabError(f"an_ls: need 0 <= epsilon < 0.5, got {epsilon}")
        self.epsilon = float(epsilon)

    def forward(self, output: Output, batch: dict) -> torch.Tensor:
        logits, pos, _, _ = _spml_parts(output, batch)
        y = pos.to(logits.dtype)
        soft = y * (1 - self.epsilon) + (1 - y) * self.epsilon
        return F.binary_cross_entropy_with_logits(logits, soft)


@LOSSES.register("wan")
class WeakAssumeNegative(LossTerm):
    """WAN: AN with the assumed-negative terms down-weighted by ``1/(C − 1)`` (Cole et al.'s γ), so
    each image's single positive weighs as much as all its assumed negatives together. Known
    negatives (partial labels) keep weight 1 [ours]."""

    def forward(self, output: Output, batch: dict) -> torch.Tensor:
        logits, pos, known_neg, unknown = _spml_parts(output, batch)
        c = logits.shape[1]
        gamma = 1.0 / max(c - 1, 1)
        loss = torch.where(pos, _neg_log_p(logits), _neg_log_q(logits))
        weight = torch.where(unknown, torch.full_like(loss, gamma), torch.ones_like(loss))
        return (loss * weight).mean()


@LOSSES.register("epr")
class ExpectedPositiveRegularizer(LossTerm):
    """EPR: BCE on the observed labels only (unknowns contribute no loss), averaged over B×C, plus
    ``(mean_i Σ_c p_ic − k)² / C²`` where k is the expected number of positives per image
    (``ctx.expected_positives``, from the full training labels when known; ``expected_positives``
    overrides it)."""

    def __init__(self, ctx: LossContext, expected_positives: float | None = None):
        super().__init__(ctx)
        k = ctx.expected_positives if expected_positives is None else expected_positives
        if not k or k <= 0:
            raise CxrlabError(f"epr: the expected number of positives per image must be > 0, got {k}")
        self.k = float(k)

    def forward(self, output: Output, batch: dict) -> torch.Tensor:
        logits, pos, known_neg, _ = _spml_parts(output, batch)
        loss = torch.where(pos, _neg_log_p(logits), torch.where(known_neg, _neg_log_q(logits), 0.0 * logits))
        return loss.mean() + _expected_positive_reg(torch.sigmoid(logits), self.k)


@LOSSES.register("role")
class ROLE(LossTerm):
    """ROLE (Regularized Online Label Estimation): a learnable label matrix for the training set,
    trained jointly with the classifier.

    The matrix is an ``n_train × C`` :class:`nn.Parameter` ``label_logits`` in logit space (row =
    ``batch['index']``). Unknown entries start uniformly in ``[logit(0.4), logit(0.6)]`` (probability
    near 0.5, as in the reference code); observed positives read as 0.995 and known negatives as
    0.005, fixed [ours: the reference initialises them there and lets them train]. With ``p`` the
    classifier's probabilities and ``e`` the label estimates of the batch, the loss is

        mean_BC[ ½·(−log p)·[observed pos]  +  ½·BCE(p, sg(e))  +  ½·BCE(e, sg(p)) ]
        + ½·(EPR(p) + EPR(e))

    with ``sg`` stop-gradient and EPR the expected-positive regulariser. ``lr_multiplier = 10``: the
    trainer gives the label matrix 10× the model's learning rate (Cole et al.), without weight decay.
    """

    lr_multiplier = 10.0
    weight_decay = 0.0

    def __init__(self, ctx: LossContext, expected_positives: float | None = None, init_spread: float = 0.1,
                 pos_value: float = 0.995, neg_value: float = 0.005, seed: int = 0):
        super().__init__(ctx)
        if ctx.n_train <= 0:
            raise CxrlabError("role: the training set is empty (ctx.n_train = 0)")
        k = ctx.expected_positives if expected_positives is None else expected_positives
        if not k or k <= 0:
            raise CxrlabError(f"role: the expected number of positives per image must be > 0, got {k}")
        if not 0 <= init_spread < 0.5 or not 0.5 < pos_value < 1 or not 0 < neg_value < 0.5:
            raise CxrlabError(f"role: need 0 <= init_spread < 0.5, 0.5 < pos_value < 1, 0 < neg_value < 0.5; got "
                              f"init_spread={init_spread}, pos_value={pos_value}, neg_value={neg_value}")
        self.k = float(k)
        self.pos_logit = _logit(pos_value)
        self.neg_logit = _logit(neg_value)
        g = torch.Generator().manual_seed(seed)
        q = _logit(0.5 + init_spread) if init_spread > 0 else 0.0
        init = q * (2 * torch.rand(ctx.n_train, ctx.num_labels, generator=g) - 1)
        self.label_logits = nn.Parameter(init)

    def estimates(self, batch: dict, pos: torch.Tensor, known_neg: torch.Tensor) -> torch.Tensor:
        """Label-estimate logits of the batch's rows, with observed entries fixed."""
        index = _batch_index("role", batch, self.ctx.n_train, self.label_logits.device)
        est = self.label_logits[index].float()
        est = torch.where(pos, torch.full_like(est, self.pos_logit), est)
        return torch.where(known_neg, torch.full_like(est, self.neg_logit), est)

    @torch.no_grad()
    def estimated_labels(self) -> torch.Tensor:
        """The label matrix as probabilities (n_train × C; observed entries not substituted)."""
        return torch.sigmoid(self.label_logits.detach())

    def forward(self, output: Output, batch: dict) -> torch.Tensor:
        logits, pos, known_neg, _ = _spml_parts(output, batch)
        est = self.estimates(batch, pos, known_neg).to(logits.dtype)
        p, e = torch.sigmoid(logits), torch.sigmoid(est)
        pos_term = torch.where(pos, _neg_log_p(logits), 0.0 * logits)
        cross_model = F.binary_cross_entropy_with_logits(logits, e.detach(), reduction="none")
        cross_labels = F.binary_cross_entropy_with_logits(est, p.detach(), reduction="none")
        main = (0.5 * pos_term + 0.5 * (cross_model + cross_labels)).mean()
        reg = 0.5 * (_expected_positive_reg(p, self.k) + _expected_positive_reg(e, self.k))
        return main + reg


class _LargeLoss(LossTerm):
    """Large Loss Matters (Kim et al., CVPR 2022): AN, except that after the first epoch the unknown
    entries with the largest AN losses in the batch — likely false negatives — are modified:
    rejected (LL-R, loss 0), corrected to positive for this step (LL-Ct), or corrected to positive
    permanently in a per-image label buffer (LL-Cp, rows indexed by ``batch['index']``).

    ``delta`` is the reference code's ``delta_rel``: a *percentage*. LL-R and LL-Ct modify a share
    ``epoch · delta / 100`` of the batch's B×C entries in epoch ``epoch`` (epochs count from 0, so
    epoch 0 is plain AN); LL-Cp, as in the reference code, corrects a constant share
    ``delta / 100`` of each batch from epoch 1 on (its corrections accumulate in the buffer).
    Defaults are the reference code's: 0.5 (LL-R), 0.2 (LL-Ct), 0.1 (LL-Cp). The loss is the mean
    of the modified loss matrix over the B×C entries.
    """

    scheme = ""
    default_delta = 0.2

    def __init__(self, ctx: LossContext, delta: float | None = None):
        super().__init__(ctx)
        delta = self.default_delta if delta is None else float(delta)
        if not 0 <= delta <= 100:
            raise CxrlabError(f"{self.scheme}: delta is a percentage per epoch, need 0 <= delta <= 100, got {delta}")
        self.delta = delta
        self.epoch = 0

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def share(self) -> float:
        """The share of the batch's entries modified this epoch."""
        return min(self.epoch * self.delta / 100.0, 1.0)

    def observed(self, batch: dict, pos: torch.Tensor) -> torch.Tensor:
        return pos

    def modified(self, loss: torch.Tensor, unknown: torch.Tensor) -> torch.Tensor:
        """Boolean B×C: the k unknown entries with the largest AN loss."""
        chosen = torch.zeros_like(unknown)
        share = self.share()
        if share <= 0:
            return chosen
        k = min(math.ceil(share * loss.numel() - 1e-9), int(unknown.sum()))
        if k <= 0:
            return chosen
        scores = torch.where(unknown, loss.detach(), torch.full_like(loss, -math.inf)).flatten()
        chosen.view(-1)[torch.topk(scores, k).indices] = True
        return chosen

    def forward(self, output: Output, batch: dict) -> torch.Tensor:
        logits, pos, _, unknown = _spml_parts(output, batch)
        pos = self.observed(batch, pos)
        unknown = unknown & ~pos
        an = torch.where(pos, _neg_log_p(logits), _neg_log_q(logits))
        chosen = self.modified(an, unknown)
        return self.combine(an, logits, chosen, batch).mean()

    def combine(self, an, logits, chosen, batch):
        raise NotImplementedError


@LOSSES.register("ll_r")
class LargeLossReject(_LargeLoss):
    __doc__ = "LL-R: the largest-loss unknown entries are rejected (contribute 0).\n\n" + _LargeLoss.__doc__
    scheme = "ll_r"
    default_delta = 0.5

    def combine(self, an, logits, chosen, batch):
        return torch.where(chosen, torch.zeros_like(an), an)


@LOSSES.register("ll_ct")
class LargeLossCorrectTemporary(_LargeLoss):
    __doc__ = "LL-Ct: the largest-loss unknown entries are taken as positive for this step only.\n\n" \
        + _LargeLoss.__doc__
    scheme = "ll_ct"
    default_delta = 0.2

    def combine(self, an, logits, chosen, batch):
        return torch.where(chosen, _neg_log_p(logits), an)


@LOSSES.register("ll_cp")
class LargeLossCorrectPermanent(_LargeLoss):
    __doc__ = "LL-Cp: the largest-loss unknown entries are corrected to positive permanently.\n\n" \
        + _LargeLoss.__doc__ + """
    The corrections live in the boolean buffer ``corrected`` (n_train × C, saved with checkpoints so a
    resumed run keeps them); corrected entries count as observed positives from then on. Corrections
    are only recorded in training mode.
    """
    scheme = "ll_cp"
    default_delta = 0.1

    def __init__(self, ctx: LossContext, delta: float | None = None):
        super().__init__(ctx, delta)
        if ctx.n_train <= 0:
            raise CxrlabError("ll_cp: the training set is empty (ctx.n_train = 0)")
        self.register_buffer("corrected", torch.zeros(ctx.n_train, ctx.num_labels, dtype=torch.bool))

    def share(self) -> float:
        return min(self.delta / 100.0, 1.0) if self.epoch >= 1 else 0.0

    def observed(self, batch: dict, pos: torch.Tensor) -> torch.Tensor:
        self._index = _batch_index("ll_cp", batch, self.ctx.n_train, self.corrected.device)
        return pos | self.corrected[self._index].to(pos.device)

    def combine(self, an, logits, chosen, batch):
        if self.training and bool(chosen.any()):
            rows, cols = chosen.nonzero(as_tuple=True)
            self.corrected[self._index[rows.to(self._index.device)], cols.to(self.corrected.device)] = True
        return torch.where(chosen, _neg_log_p(logits), an)
