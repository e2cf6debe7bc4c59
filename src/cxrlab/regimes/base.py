"""A regime decides how one training step turns a batch into the Output the objective scores."""
from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

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

    What a regime declares (``check_parts`` compares it with the head and the loss terms at recipe
    load): ``requires``, the extras keys it reads from the head's Output; ``one_feature_map``, whether it
    works on one backbone's feature map (then heads with the ``several_maps`` capability do not fit);
    :meth:`extras_for`, the extras keys it adds to the head's.
    """

    requires: ClassVar[frozenset[str]] = frozenset()
    one_feature_map: ClassVar[bool] = False

    def __init__(self, weak: Augment, strong: Augment):
        self.weak = weak
        self.strong = strong
        self.modules = torch.nn.ModuleDict()

    @classmethod
    def extras_for(cls, args: dict | None = None) -> frozenset[str]:
        """The extras keys a step adds to the head's when built with ``args`` (``regime.args``)."""
        return frozenset()

    def step(self, model, batch: dict) -> Output:
        raise NotImplementedError

    def epoch_stats(self) -> dict:
        """Per-epoch measurements the trainer logs (then resets); none by default."""
        return {}


@REGIMES.register("supervised")
class Supervised(Regime):
    """Plain supervised training: one weakly augmented view per image."""

    def step(self, model, batch: dict) -> Output:
        return model(self.weak(batch["image"]))
