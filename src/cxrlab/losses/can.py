"""CAN's losses: the multi-label balance loss and the attention loss.

Ma, Wang, Hoi, "Multi-label Thoracic Disease Image Classification with Cross-Attention Networks",
MICCAI 2019 (arXiv:2007.10859). The paper names the two losses and their purpose; the formulas are our
reconstruction ([ours] in the spec).

``ml_balance`` — class-balanced focal BCE, per label c and image:
``−[β⁺_c (1−p)^γ y log p + β⁻_c p^γ (1−y) log(1−p)]``, with β⁺_c the share of negatives and β⁻_c the
share of positives among the known entries of label c, so the rarer side of each label weighs more;
``(1−p)^γ`` / ``p^γ`` down-weight the easy examples. Averaged over the known entries. ``beta``:
``train`` (counted once on the training split, from the LossContext), ``batch`` (counted on each
batch; a label with no positive in the batch then gets no weight on its negatives) or ``none``
(β = 1: with γ = 0 this is exactly BCE). Works with any head (with ``linear`` it is a baseline).

``can_attention`` — ``L_att = ml_balance(cross_logits) + μ · mean (σ(s₁) − σ(s₂))²``: the balance loss
on the auxiliary classifier of the pooled cross map A, so A itself must be discriminative, plus a
consistency term pulling the two streams' own predictions together (μ = 0.1; squared difference of
probabilities, over every entry: it needs no label). Needs the ``cross_logits`` and ``stream_logits``
extras of the ``cross_attention`` head (with ``head_args.auxiliary`` on); a recipe with any other head
is refused when it is loaded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import CxrlabError, unknown
from ..output import Output
from ..registry import LOSSES
from .base import LossContext, LossTerm, masked_mean

BETA_SOURCES = ("train", "batch", "none")


def balance_weights(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(β⁺, β⁻)`` per label from positive/negative counts: the negatives' and the positives' share.
    A label with no known entry gets 1/2 each (it contributes nothing anyway)."""
    total = pos + neg
    known = total > 0
    safe = torch.where(known, total, torch.ones_like(total))
    half = torch.full_like(total, 0.5)
    return torch.where(known, neg / safe, half), torch.where(known, pos / safe, half)


def balanced_focal_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                       beta_pos: torch.Tensor | float, beta_neg: torch.Tensor | float, gamma: float) -> torch.Tensor:
    """Mean over known entries of ``−[β⁺ (1−p)^γ y log p + β⁻ p^γ (1−y) log(1−p)]`` (log-sigmoids, so
    large logits neither overflow nor lose their gradient)."""
    log_p, log_q = F.logsigmoid(logits), F.logsigmoid(-logits)  # log p, log(1 − p)
    pos = beta_pos * target * torch.exp(gamma * log_q) * log_p
    neg = beta_neg * (1 - target) * torch.exp(gamma * log_p) * log_q
    return masked_mean(-(pos + neg), mask)


class _Balance(LossTerm):
    def __init__(self, ctx: LossContext, gamma: float = 2.0, beta: str = "train"):
        super().__init__(ctx)
        name = type(self).loss_name
        if beta not in BETA_SOURCES:
            raise unknown(f"loss {name} argument beta", str(beta), BETA_SOURCES)
        if gamma < 0:
            raise CxrlabError(f"loss {name}: gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.beta = beta
        bp, bn = balance_weights(torch.as_tensor(ctx.pos_count, dtype=torch.float32),
                                 torch.as_tensor(ctx.neg_count, dtype=torch.float32))
        # derived from the training split whenever the objective is built: not saved state
        self.register_buffer("beta_pos", bp, persistent=False)
        self.register_buffer("beta_neg", bn, persistent=False)

    def balance(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        logits = logits.float()  # sum the loss in fp32 under autocast
        target = batch["target"].to(logits.dtype)
        mask = batch["mask"].to(logits.dtype) if "mask" in batch else torch.ones_like(target)
        if self.beta == "none":
            bp = bn = 1.0
        elif self.beta == "batch":
            with torch.no_grad():
                bp, bn = balance_weights((target * mask).sum(0), ((1 - target) * mask).sum(0))
        else:
            bp, bn = self.beta_pos.to(logits.dtype), self.beta_neg.to(logits.dtype)
        return balanced_focal_bce(logits, target, mask, bp, bn, self.gamma)


@LOSSES.register("ml_balance")
class MultiLabelBalance(_Balance):
    """CAN's multi-label balance loss on the model's logits. Args: ``gamma`` (2.0), ``beta``
    ``train`` | ``batch`` | ``none`` (``train``)."""

    loss_name = "ml_balance"

    def forward(self, output: Output, batch: dict) -> torch.Tensor:
        return self.balance(output.logits, batch)


@LOSSES.register("can_attention")
class CANAttention(_Balance):
    """CAN's attention loss: balance loss on the cross map's auxiliary classifier + ``mu`` × stream
    consistency. Args: ``gamma`` (2.0), ``beta`` (``train``), ``mu`` (0.1)."""

    loss_name = "can_attention"
    requires = frozenset({"cross_logits", "stream_logits"})  # cross_attention head, head_args.auxiliary on

    def __init__(self, ctx: LossContext, gamma: float = 2.0, beta: str = "train", mu: float = 0.1):
        super().__init__(ctx, gamma, beta)
        if mu < 0:
            raise CxrlabError(f"loss can_attention: mu must be >= 0, got {mu}")
        self.mu = float(mu)

    def forward(self, output: Output, batch: dict) -> torch.Tensor:
        extras = self.extras(output)
        streams = torch.sigmoid(extras["stream_logits"].float())  # B×2×L
        consistency = (streams[:, 0] - streams[:, 1]).pow(2).mean()
        return self.balance(extras["cross_logits"], batch) + self.mu * consistency
