"""The Output contract: what every head returns and every loss term reads."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Output:
    """``logits`` is B×L. ``extras`` holds named auxiliary tensors a head or regime produces.

    Extras keys in use (a head or regime documents which it fills):
      ``features``        B×D pooled image features
      ``label_features``  B×L×D' label-level features (LCL, label-query heads)
      ``attention``       B×L×h×w per-label spatial attention (sums to 1 over space); heatmaps use it
      ``label_attention`` B×L×L label-to-label self-attention weights (averaged over heads)
      ``correlation``     L×L global label-correlation matrix G (rows sum to 1)
      regime extras (two-view training): ``pseudo_target``, ``pseudo_mask``, ``weak_logits``,
      ``fpc_logits``, ``btc_logits``
    """

    logits: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
