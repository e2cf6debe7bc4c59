"""The standard head: global average pooling and one linear layer (CheXNet-style).

Its native map is the class activation map (Zhou et al., "Learning Deep Features for Discriminative
Localization", CVPR 2016): ``CAM_c = relu(w_c · F + b_c)``, the classifier applied at every location of
the feature map before pooling.
"""
from __future__ import annotations

import torch
from torch import nn

from ...output import Output
from ...registry import HEADS
from .base import Capability, Head


@HEADS.register("linear")
class LinearHead(Head):
    provides = frozenset({"features"})
    capabilities = frozenset({Capability.NATIVE_MAPS})

    def __init__(self, in_features: int, num_labels: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_labels)

    def forward(self, fmap) -> Output:
        pooled = fmap.mean(dim=(2, 3))
        return Output(self.fc(self.dropout(pooled)), {"features": pooled})

    def native_maps(self, fmap, out: Output) -> torch.Tensor:
        cam = torch.einsum("ld,bdhw->blhw", self.fc.weight.float(), fmap.float())  # two operands (ONNX-friendly)
        return torch.relu(cam + self.fc.bias.float()[None, :, None, None])
