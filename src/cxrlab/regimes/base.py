"""A regime decides how one training step turns a batch into the Output the objective scores."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..output import Output
from ..registry import REGIMES

Augment = Callable[[torch.Tensor], torch.Tensor]  # B×1×H×W float in [0,1] -> same shape


class Regime:
    """Built as ``Regime(weak=augment, strong=augment, **args)``; ``step(model, batch) -> Output``.

    ``model`` is a :class:`cxrlab.models.CxrModel`; ``batch['image']`` is B×1×H×W in [0,1] on the
    training device, not yet augmented. Regimes that need extra modules during training only
    (e.g. MPC's batch transformer) expose them as ``modules`` (an nn.ModuleDict, trained and
    checkpointed with the model, never used at inference).
    """

    def __init__(self, weak: Augment, strong: Augment):
        self.weak = weak
        self.strong = strong
        self.modules = torch.nn.ModuleDict()

    def step(self, model, batch: dict) -> Output:
        raise NotImplementedError


@REGIMES.register("supervised")
class Supervised(Regime):
    """Plain supervised training: one weakly augmented view per image."""

    def step(self, model, batch: dict) -> Output:
        return model(self.weak(batch["image"]))
