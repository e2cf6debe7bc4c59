"""The standard head: global average pooling and one linear layer (CheXNet-style)."""
from __future__ import annotations

from torch import nn

from ...output import Output
from ...registry import HEADS


@HEADS.register("linear")
class LinearHead(nn.Module):
    def __init__(self, in_features: int, num_labels: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_labels)

    def forward(self, fmap) -> Output:
        pooled = fmap.mean(dim=(2, 3))
        return Output(self.fc(self.dropout(pooled)), {"features": pooled})
