"""MSML, the multi-label softmax loss, and CorLoss, the disease/health correlation loss.

Ge, Mahapatra, Sedai, Garnavi, Chakravorty, "Chest X-rays Classification: A Multi-Label and
Fine-Grained Problem", arXiv:1807.07247 (2018), and the journal extension Ge, Mahapatra, Chang, Chen,
Chi, Lu, "Improving multi-label chest X-ray disease diagnosis by exploiting disease and health labels
dependencies", Multimedia Tools and Applications 79 (2020) 14889-14902. The papers' recipe is
``L = BCE + 0.1 MSML + 0.3 CorLoss``.

``msml``: every known positive ``p`` of image ``i`` competes in a softmax against the known negatives
``N_i`` of the same image (never against the other positives):

    L_i = (1/|P_i|) Σ_{p∈P_i} softplus(logsumexp_{n∈N_i} s_n − s_p)
        = −(1/|P_i|) Σ_p log(e^{s_p} / (e^{s_p} + Σ_n e^{s_n}))

``log: false`` drops the log (the reading of a third-party re-implementation of the 2020 paper,
github pattywong/Multi-label-Classification-of-Chest-X-ray-Images-for-Disease-Diagnosis,
``baseline/custom_loss1.py``; unverified against the paper): each positive's softmax probability
against the negatives, averaged and negated,

    L_i = −(1/|P_i|) Σ_{p∈P_i} e^{s_p} / (e^{s_p} + Σ_n e^{s_n}) = −(1/|P_i|) Σ_p σ(s_p − logsumexp_n s_n),

which lies in [−1, 0]. Its gradient in ``d = s_p − logsumexp_n s_n`` is ``−σ(d)(1 − σ(d))``: largest
for a positive on the fence (probability ½) and vanishing at both ends, so unlike the log form
(gradient ``−(1 − σ(d))``, near −1 for a badly ranked positive) it gives up on positives that lose
clearly. That source weighs it 0.3 (``L = BCE + 0.3 MSML + 0.2 CorLoss``).

Unknown labels (mask 0) are neither positive nor negative. An image with a positive but no negative
has nothing to compete against and contributes nothing; the batch loss is the mean over the images
that have both. Healthy images (no positive) are handled by ``healthy``:

* ``no_finding`` (default): the label space carries a "No Finding" output (``data.add_no_finding: true``
  adds it, positive exactly when no other label is), treated as an ordinary label, so every image has
  a positive and disease images push "No Finding" down.
* ``skip``: healthy images contribute nothing; a "No Finding" label, if present, is left out of the
  softmax altogether.

``corloss`` (the papers give no formula), one switch ``form``, two reconstructions [ours] and the
third-party formula:

* ``exclusivity``: ``p_health · max_d p_d``, with ``p = sigmoid(logits)``, ``p_health`` the "No Finding"
  probability and ``d`` every other label: penalises "healthy" and a disease being likely together.
  Needs a "No Finding" output. It reads no labels (all outputs exist whatever the mask).
* ``correlation``: ``1 − pearson(p_i, y_i)`` over the known outputs of image ``i``; images whose known
  labels are constant (e.g. all negative without "No Finding") or fewer than two are skipped.
* ``positive_product`` (the third-party re-implementation above, weight 0.2 there):
  ``−|Π_{c∈P_i} σ(s_c)|``, the product of the known positives' probabilities (the absolute value is
  moot: the product is positive), computed as ``−exp(Σ_c log σ(s_c))`` so no factor underflows on its
  own. The product shrinks geometrically with the number of positives (k labels at p = 0.9 give 0.9^k:
  0.35 for k = 10), and so does its gradient ``∂/∂s_c = −Π · (1 − σ(s_c))``: images with many findings
  pull weakly, and an image with a hopeless positive (Π ≈ 0) pulls none of its labels up. Images
  without a known positive (empty product 1, no gradient) are left out of the mean.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import CxrlabError, unknown
from ..labels import NO_FINDING
from ..output import Output
from ..registry import LOSSES
from .base import LossContext, LossTerm

HEALTHY_CHOICES = ("no_finding", "skip")
CORLOSS_FORMS = ("exclusivity", "correlation", "positive_product")


def _parts(output: Output, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = output.logits.float()  # fp32 under autocast: logsumexp and Pearson sums
    target = batch["target"].to(logits.dtype)
    mask = batch["mask"].to(logits.dtype) if "mask" in batch else torch.ones_like(target)
    return logits, target, mask


def _no_finding_index(ctx: LossContext, loss: str, label: str, why: str) -> int:
    if label not in ctx.label_names:
        raise CxrlabError(f"loss {loss!r}: {why} needs a {label!r} output, but the label space "
                          f"({', '.join(ctx.label_names)}) has none; set data.add_no_finding: true "
                          f"(or use an option that does not need it)")
    return ctx.label_names.index(label)


def msml_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, log: bool = True) -> torch.Tensor:
    """The MSML loss of a batch (see the module docstring); ``mask`` 1 = known; ``log`` False: the
    negated softmax probability instead of its negative log. Mean over the images with at least one
    known positive and one known negative; 0 (with gradient) when there is none."""
    positive = (target > 0.5) & (mask > 0.5)
    negative = (target <= 0.5) & (mask > 0.5)
    has_negative = negative.any(dim=1)
    # masked logsumexp over the negatives; a row without negatives gets 0 (finite, no NaN gradient)
    # and is dropped below
    filled = logits.masked_fill(~negative, float("-inf")).masked_fill(~has_negative[:, None], 0.0)
    lse = torch.logsumexp(filled, dim=1, keepdim=True)
    # softplus(lse − s_p) = −log σ(s_p − lse) = −log softmax probability of p against the negatives
    per_positive = (F.softplus(lse - logits) if log else -torch.sigmoid(logits - lse)) * positive
    n_pos = positive.sum(dim=1)
    counted = (n_pos > 0) & has_negative
    per_image = per_positive.sum(dim=1) / n_pos.clamp_min(1)
    return (per_image * counted).sum() / counted.sum().clamp_min(1)


@LOSSES.register("msml")
class MSML(LossTerm):
    """Multi-label softmax loss (Ge et al., arXiv:1807.07247, 2018); ``healthy`` = ``no_finding`` |
    ``skip`` (images without a positive), ``no_finding_label`` names the health output; ``log``
    (True: the paper's softmax log-loss; False: the negated probability of the third-party
    re-implementation, see the module docstring)."""

    def __init__(self, ctx: LossContext, healthy: str = "no_finding", no_finding_label: str = NO_FINDING,
                 log: bool = True):
        super().__init__(ctx)
        if healthy not in HEALTHY_CHOICES:
            raise unknown("msml option healthy", str(healthy), HEALTHY_CHOICES)
        if not isinstance(log, bool):
            raise CxrlabError(f"loss 'msml': option log must be true or false, got {log!r}")
        self.healthy, self.log = healthy, log
        if healthy == "no_finding":
            _no_finding_index(ctx, "msml", no_finding_label, "healthy: no_finding")
        keep = torch.ones(ctx.num_labels, dtype=torch.bool)
        if healthy == "skip" and no_finding_label in ctx.label_names:
            keep[ctx.label_names.index(no_finding_label)] = False
        self.register_buffer("columns", keep, persistent=False)

    def forward(self, output: Output, batch: dict) -> torch.Tensor:
        logits, target, mask = _parts(output, batch)
        return msml_loss(logits, target, mask * self.columns.to(mask.dtype), log=self.log)


def exclusivity_loss(logits: torch.Tensor, health: int) -> torch.Tensor:
    """Mean over images of ``p_health · max_{d≠health} p_d``."""
    probs = torch.sigmoid(logits)
    diseases = torch.cat([probs[:, :health], probs[:, health + 1:]], dim=1)
    return (probs[:, health] * diseases.amax(dim=1)).mean()


def correlation_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     eps: float = 1e-6) -> torch.Tensor:
    """Mean over images of ``1 − pearson(p_i, y_i)`` over the known outputs; images with fewer than two
    known labels or constant known labels are skipped (Pearson undefined)."""
    probs = torch.sigmoid(logits)
    n = mask.sum(dim=1)
    n_safe = n.clamp_min(1)
    p_mean = (probs * mask).sum(1, keepdim=True) / n_safe[:, None]
    y_mean = (target * mask).sum(1, keepdim=True) / n_safe[:, None]
    dp, dy = (probs - p_mean) * mask, (target - y_mean) * mask
    cov = (dp * dy).sum(1)
    var_y = (dy * dy).sum(1)
    # eps keeps the gradient finite when the probabilities of an image are all equal
    r = cov / torch.sqrt(((dp * dp).sum(1) + eps) * var_y.clamp_min(eps))
    counted = (n >= 2) & (var_y > 0)
    return ((1 - r) * counted).sum() / counted.sum().clamp_min(1)


def positive_product_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over images with a known positive of ``−Π_{c∈P_i} σ(s_c)``, summed in log space."""
    positive = ((target > 0.5) & (mask > 0.5)).to(logits.dtype)
    log_product = (F.logsigmoid(logits) * positive).sum(dim=1)
    counted = positive.sum(dim=1) > 0
    return (-torch.exp(log_product) * counted).sum() / counted.sum().clamp_min(1)


@LOSSES.register("corloss")
class CorLoss(LossTerm):
    """CorLoss (Ge et al., Multimedia Tools and Applications 79, 2020); ``form`` = ``exclusivity`` (needs
    a "No Finding" output) | ``correlation`` [both ours: reconstructions] | ``positive_product`` (the
    third-party re-implementation's formula; see the module docstring)."""

    def __init__(self, ctx: LossContext, form: str = "exclusivity", no_finding_label: str = NO_FINDING):
        super().__init__(ctx)
        if form not in CORLOSS_FORMS:
            raise unknown("corloss option form", str(form), CORLOSS_FORMS)
        self.form = form
        self.health = _no_finding_index(ctx, "corloss", no_finding_label, "form: exclusivity") \
            if form == "exclusivity" else None
        if form == "exclusivity" and ctx.num_labels < 2:
            raise CxrlabError("loss 'corloss': form exclusivity needs at least one label besides "
                              f"{no_finding_label!r}")

    def forward(self, output: Output, batch: dict) -> torch.Tensor:
        logits, target, mask = _parts(output, batch)
        if self.form == "exclusivity":
            return exclusivity_loss(logits, self.health)
        if self.form == "positive_product":
            return positive_product_loss(logits, target, mask)
        return correlation_loss(logits, target, mask)
