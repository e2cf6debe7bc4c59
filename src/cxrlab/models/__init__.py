"""Model = timm backbone (feature map) + a registered head (returns an Output)."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ..errors import unknown
from ..output import Output
from ..registry import HEADS
from .backbone import Backbone


class CxrModel(nn.Module):
    """``forward(x: B×1×H×W in [0,1]) -> Output``. ``features`` and ``head`` are usable apart
    (regimes perturb the feature map between them)."""

    def __init__(self, backbone: Backbone, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> Output:
        return self.head(self.backbone(x))


def check_head(head: str, head_args: dict | None = None):
    """The registered head class, after checking that it accepts every key of ``head_args``."""
    head_cls = HEADS.get(head)
    accepted = [p for p in inspect.signature(head_cls).parameters if p not in ("in_features", "num_labels")]
    for key in head_args or {}:
        if key not in accepted:
            raise unknown(f"model.head_args key for head {head!r}", key, accepted)
    return head_cls


def build_model(backbone: str, head: str, num_labels: int, pretrained: bool | str = False,
                drop_rate: float = 0.0, head_args: dict | None = None) -> CxrModel:
    net = Backbone(backbone, pretrained=pretrained, drop_rate=drop_rate)
    head_cls = check_head(head, head_args)
    head_module = head_cls(net.num_features, num_labels, **dict(head_args or {}))
    return CxrModel(net, head_module)
