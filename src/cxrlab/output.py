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
      ``attention``       B×L×h×w per-label spatial attention; heatmaps use it (rescaled per map). The
                          softmax heads' maps (lcl, label_query) sum to 1 over space; cross_attention's
                          are sigmoid gates, each location in [0, 1], not normalised over space
      ``stream_logits``   B×K×L each backbone stream's own logits (cross_attention: K = 2)
      ``cross_pooled``    B×D global average of the cross map A = F1' ⊙ F2' (cross_attention)
      ``cross_logits``    B×L auxiliary classifier on ``cross_pooled`` (the can_attention loss reads it)
      ``label_attention`` B×L×L label-to-label self-attention weights (averaged over heads)
      ``correlation``     L×L global label-correlation matrix G (rows sum to 1)
      ``global_logits``   B×L logits of a label-level head's global branch fc(GAP F) (lcl, label_query
                          with ``global_branch``; the head's logits average them with ``label_logits``)
      ``label_logits``    B×L logits of the label branch alone (same heads; the lcl_branches loss reads both)
      ``embedding``       B×D image embeddings z in the label metric space (prototype head; unit
                          vectors with its default metric, cosine)
      ``prototypes``      L×D label prototypes q (prototype head; not batched; unit except metric euclidean)
      ``similarity``      B×L scores m_ic: cosines cos(z_i, q_c) in [-1, 1] by default, 1 − ½‖z_i − q_c‖² or
                          z_i · q_c with the head's other metrics (the dwml losses read it)
      ``member_probs``    B×K×L each member's probabilities (an ensemble of K checkpoints; cxrlab.ensemble)
      regime extras (two-view training): ``pseudo_target``, ``pseudo_mask``, ``weak_logits``,
      ``fpc_logits``, ``btc_logits``
    """

    logits: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
