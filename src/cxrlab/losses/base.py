"""The Objective (a weighted sum of named loss terms) and what every term may know of the data."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import CxrlabError
from ..labels import label_cooccurrence
from ..output import Output
from ..registry import HEADS, LOSSES, REGIMES


@dataclass
class LossContext:
    """Training-set facts a loss term may need, computed once from the training targets and masks.

    ``pos_count``/``neg_count`` count known positives/negatives per label; ``cooccurrence`` is
    P(label j positive | label i positive) over images where both are known
    (:func:`cxrlab.labels.label_cooccurrence`; rows sum to anything, diagonal 1);
    ``expected_positives`` is the mean number of positives per image in the *full* labels when known
    (EPR/ROLE use it), else the observed mean.
    """

    label_names: tuple[str, ...]
    n_train: int
    pos_count: np.ndarray
    neg_count: np.ndarray
    cooccurrence: np.ndarray
    expected_positives: float
    extras: dict = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @classmethod
    def from_targets(cls, label_names, target: np.ndarray, mask: np.ndarray,
                     full_target: np.ndarray | None = None) -> "LossContext":
        target = np.asarray(target, dtype=np.float64)
        mask = np.asarray(mask, dtype=np.float64)
        pos = (target * mask).sum(0)
        neg = ((1 - target) * mask).sum(0)
        known_pos = target * mask
        cooc = np.nan_to_num(label_cooccurrence(target, mask))  # a label never positive: a zero row
        reference = full_target if full_target is not None else known_pos
        return cls(tuple(label_names), len(target), pos, neg, cooc,
                   float(np.asarray(reference, dtype=np.float64).sum(1).mean()) if len(target) else 0.0)


class LossTerm(nn.Module):
    """A loss term: built as ``Term(ctx, **args)``, called as ``term(output, batch) -> scalar``.

    ``batch`` is a dict with at least ``target`` (B×L), ``mask`` (B×L, 1 = known) and ``index``
    (B, row of the training set, for terms that keep per-image state). Masked entries never
    contribute to a supervised term. Terms with per-epoch behaviour override ``on_epoch_start``.

    ``requires``: the ``Output.extras`` keys the term reads. A recipe's head and regime must provide
    them (``check_parts`` refuses the recipe at load otherwise); :meth:`extras` reads them.
    """

    requires: ClassVar[frozenset[str]] = frozenset()
    # a term's own trainable parameters (e.g. ROLE's label matrix) form an optimiser group of their own
    lr_multiplier: ClassVar[float] = 1.0
    weight_decay: ClassVar[float] = 0.0

    def __init__(self, ctx: LossContext | None = None):
        # None: a term that needs no training-set statistics (BCE, focal, ASL) is built without them;
        # a term that reads them takes ``ctx`` as a required argument of its own
        super().__init__()
        self.ctx = ctx

    def extras(self, output: Output) -> dict[str, torch.Tensor]:
        """The required extras of ``output``, fp16/bf16 ones in fp32. A recipe's parts were checked at
        load; this one-line error is for a term used in a loop of one's own."""
        missing = self.requires - output.extras.keys()
        if missing:
            heads, regimes = HEADS.providers(missing), REGIMES.providers(missing)
            part = f"head {' or '.join(heads)} (model.head={heads[0]})" if heads else \
                f"regime {' or '.join(regimes)} (regime: {regimes[0]})" if regimes else "a head or regime that fills them"
            raise CxrlabError(f"loss {LOSSES.name_of(type(self)) or type(self).__name__} needs {part}: it reads the "
                              f"Output extras {', '.join(sorted(missing))}, and this model's output has "
                              f"{sorted(output.extras)}")
        return {k: output.extras[k].float() if output.extras[k].dtype in (torch.float16, torch.bfloat16)
                else output.extras[k] for k in self.requires}

    def on_epoch_start(self, epoch: int) -> None:  # noqa: B027 - optional hook
        pass


def target_and_mask(batch: dict, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's ``target`` and ``mask`` (all ones when the batch has none) in ``like``'s dtype and device:
    the one place every loss term reads labels from."""
    target = batch["target"].to(device=like.device, dtype=like.dtype)
    mask = batch["mask"].to(device=like.device, dtype=like.dtype) if "mask" in batch else torch.ones_like(target)
    return target, mask


def float_logits(output: Output) -> torch.Tensor:
    """The logits in at least fp32: under autocast losses are summed in fp32."""
    logits = output.logits
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


class LabelLoss(LossTerm):
    """A term that needs nothing but logits, targets and the mask. Call it from a recipe's objective as
    ``term(output, batch)`` or from your own loop as ``term(logits, target, mask=None)``;
    subclasses implement ``loss(logits, target, mask)`` (fp32 logits, mask 1 = known)."""

    def forward(self, output, batch, mask=None) -> torch.Tensor:
        if isinstance(output, Output):
            logits = float_logits(output)
            target, mask = target_and_mask(batch, logits)
        else:
            logits = output.float() if output.dtype in (torch.float16, torch.bfloat16) else output
            target = torch.as_tensor(batch).to(device=logits.device, dtype=logits.dtype)
            mask = torch.ones_like(target) if mask is None else torch.as_tensor(mask).to(target)
        return self.loss(logits, target, mask)

    def loss(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over entries where ``mask`` is 1; 0 (with gradient) when nothing is known."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


class Objective(nn.Module):
    """``L = Σ_k w_k · term_k(output, batch)``; returns the total and every term's value by name."""

    def __init__(self, spec: dict, ctx: LossContext):
        super().__init__()
        if not spec:
            raise CxrlabError("the objective has no loss term: set e.g. `loss: {bce: 1.0}`")
        self.weights: dict[str, float] = {}
        terms = {}
        for name, value in spec.items():
            args = dict(value) if isinstance(value, dict) else {"weight": value}
            weight = float(args.pop("weight", 1.0))
            factory = LOSSES.get(name)
            try:
                terms[name] = factory(ctx, **args)
            except TypeError as exc:
                raise CxrlabError(f"loss {name!r}: bad arguments {args}: {exc}") from exc
            self.weights[name] = weight
        self.terms = nn.ModuleDict(terms)

    def on_epoch_start(self, epoch: int) -> None:
        for term in self.terms.values():
            term.on_epoch_start(epoch)

    def forward(self, output: Output, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        total = output.logits.new_zeros(())
        values = []
        for name, term in self.terms.items():
            value = term(output, batch)
            total = total + self.weights[name] * value
            values.append(value.detach().float())
        # one device-to-host copy for all logged values (one GPU sync per step, not one per term)
        logged = torch.stack(values + [total.detach().float()]).tolist()
        return total, dict(zip([*self.terms, "loss"], logged))
