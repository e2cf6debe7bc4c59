"""Heads for two backbones: CAN's cross-attention and a plain concatenation control.

``cross_attention`` — Ma, Wang, Hoi, "Multi-label Thoracic Disease Image Classification with
Cross-Attention Networks", MICCAI 2019 (arXiv:2007.10859). The paper's idea is that the element-wise
product of two networks' feature maps is an attention that keeps what both see and suppresses what only
one sees (attention noise). The layout below is our reconstruction ([ours] in the spec):

1. align the two maps to ``dim`` channels with 1×1 convolutions: ``F1'``, ``F2'`` (B×dim×h×w); maps of
   different sizes are average-pooled to the smaller one (``resize: smaller``) or refused (``none``);
2. cross map ``A = F1' ⊙ F2'``; per-label attention ``M = sigmoid(conv1x1(A))`` (B×L×h×w; with
   ``shared_attention`` one map for every label);
3. label-wise pooling of each attended stream, ``z_{k,c} = mean_hw(M_c ⊙ F_k')`` (B×L×dim);
4. per-label classifier on the concatenation ``[z_{1,c}, z_{2,c}]``, written as the mean of the two
   streams' own per-label scores ``s_{k,c} = w_{k,c} · z_{k,c} + b_{k,c}``: ``logit_c = (s_{1,c} +
   s_{2,c}) / 2`` (a linear classifier on the concatenation, split so each stream has its own logits);
5. with ``auxiliary`` (default), a linear classifier on the global average of ``A``: the input of
   CAN's attention loss (:mod:`cxrlab.losses.can`).

Extras: ``attention`` (M, B×L×h×w, sigmoid gates in [0, 1], not normalised over space; heatmaps read
it), ``stream_logits`` (B×2×L), ``cross_pooled`` (B×dim, mean of A), ``cross_logits`` (B×L, auxiliary
classifier; only with ``auxiliary``), ``label_features`` (B×L×2·dim) and ``features`` (B×2·dim).

``concat`` — the control for doubled capacity: global average pool of every map, concatenated, one
linear layer (no interaction between the streams before the classifier).

Both heads take the list of feature maps a model with several backbones gives (``model.backbones``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CxrlabError, unknown
from ...output import Output
from ...registry import HEADS
from .base import Capability, Head

RESIZE = ("smaller", "none")


def check_maps(maps, in_features: list[int], head: str) -> None:
    """The maps a head for several backbones receives: a list of B×D_k×h×w tensors, D_k as built."""
    if not isinstance(maps, (list, tuple)):
        shape = tuple(maps.shape) if torch.is_tensor(maps) else type(maps).__name__
        raise CxrlabError(f"head {head} needs the feature maps of {len(in_features)} backbones "
                          f"(model.backbones), got one map of shape {shape}")
    shapes = [tuple(int(v) for v in m.shape) for m in maps]  # ints: the ONNX tracer gives tensor sizes
    expected = ", ".join(f"B×{d}×h×w" for d in in_features)
    if len(maps) != len(in_features) or any(len(s) != 4 or s[1] != d for s, d in zip(shapes, in_features)):
        raise CxrlabError(f"head {head}: expected maps {expected}, got shapes {shapes}")
    if len({s[0] for s in shapes}) != 1:
        raise CxrlabError(f"head {head}: the maps' batch sizes differ: shapes {shapes}")


def align_maps(maps: list[torch.Tensor], resize: str, head: str) -> list[torch.Tensor]:
    """Bring the maps to one spatial size: average pooling down to the smaller map (which must be no
    larger than the other in both height and width), or an error naming the shapes."""
    sizes = [tuple(int(v) for v in m.shape[-2:]) for m in maps]  # ints (tensor sizes when traced)
    if len(set(sizes)) == 1:
        return list(maps)
    shapes = [tuple(m.shape) for m in maps]
    smallest = min(sizes, key=lambda s: s[0] * s[1])
    if resize == "none":
        raise CxrlabError(f"head {head}: feature maps of different sizes {shapes} and head_args.resize='none'; "
                          "use resize='smaller', or backbones with the same output stride")
    if any(h < smallest[0] or w < smallest[1] for h, w in sizes):
        raise CxrlabError(f"head {head}: cannot align feature maps of shapes {shapes}: neither fits inside the "
                          "other; use backbones with the same output stride (model.output_stride) or input size")
    return [m if tuple(m.shape[-2:]) == smallest else F.adaptive_avg_pool2d(m, smallest) for m in maps]


def _several(in_features, head: str, exactly: int | None = None) -> list[int]:
    if isinstance(in_features, int):
        raise CxrlabError(f"head {head} needs several backbones: set model.backbones, e.g. [resnet18, resnet18] "
                          "(model.backbone gives one)")
    in_features = [int(d) for d in in_features]
    if exactly is not None and len(in_features) != exactly:
        raise CxrlabError(f"head {head} takes exactly {exactly} backbones, model.backbones names {len(in_features)}")
    if len(in_features) < 2:
        raise CxrlabError(f"head {head} needs at least two backbones in model.backbones, got {len(in_features)}")
    return in_features


@HEADS.register("cross_attention")
class CrossAttentionHead(Head):
    """CAN cross-attention head (Ma, Wang, Hoi, MICCAI 2019) for two backbones.

    Args (``head_args``): ``dim`` aligned channels (256); ``shared_attention`` one map for all labels
    (False); ``auxiliary`` classifier on pooled A for the ``can_attention`` loss (True; turn it off when
    that loss is not used, so that no parameter goes without gradient under DDP); ``dropout`` on the
    pooled label features (0.0); ``resize`` ``smaller`` | ``none`` for maps of different sizes.
    """

    provides = frozenset({"attention", "stream_logits", "cross_pooled", "cross_logits", "label_features",
                          "features"})
    capabilities = frozenset({Capability.SEVERAL_MAPS, Capability.NATIVE_MAPS})

    @classmethod
    def extras_for(cls, head_args: dict | None = None) -> frozenset[str]:
        # the auxiliary classifier (cross_logits) exists only with auxiliary on
        auxiliary = (head_args or {}).get("auxiliary", True)
        return cls.provides if auxiliary else cls.provides - {"cross_logits"}

    def __init__(self, in_features: list[int], num_labels: int, dim: int = 256, shared_attention: bool = False,
                 auxiliary: bool = True, dropout: float = 0.0, resize: str = "smaller"):
        super().__init__()
        self.in_features = _several(in_features, "cross_attention", exactly=2)
        if resize not in RESIZE:
            raise unknown("cross_attention head_args.resize", resize, RESIZE)
        if dim < 1:
            raise CxrlabError(f"cross_attention: dim must be >= 1, got {dim}")
        self.num_labels = num_labels
        self.resize = resize
        self.shared_attention = bool(shared_attention)
        self.align = nn.ModuleList(nn.Conv2d(d, dim, kernel_size=1) for d in self.in_features)
        self.attend = nn.Conv2d(dim, 1 if self.shared_attention else num_labels, kernel_size=1)
        # small weights: M starts near 0.5 everywhere, i.e. pooling starts close to plain averaging
        nn.init.normal_(self.attend.weight, std=0.01)
        nn.init.zeros_(self.attend.bias)
        self.dropout = nn.Dropout(dropout)
        # per-label classifier, one weight vector per label and stream (the concatenation, split)
        self.cls_weight = nn.Parameter(torch.empty(2, num_labels, dim))
        self.cls_bias = nn.Parameter(torch.zeros(2, num_labels))
        nn.init.trunc_normal_(self.cls_weight, std=dim ** -0.5)
        self.auxiliary = nn.Linear(dim, num_labels) if auxiliary else None

    def forward(self, maps: list[torch.Tensor]) -> Output:
        check_maps(maps, self.in_features, "cross_attention")
        f1, f2 = (conv(m) for conv, m in zip(self.align, align_maps(maps, self.resize, "cross_attention")))
        cross = f1 * f2  # A
        b, _, h, w = cross.shape
        attention = torch.sigmoid(self.attend(cross))
        if self.shared_attention:
            attention = attention.expand(b, self.num_labels, h, w)
        # z_{k,c} = mean over locations of M_c ⊙ F_k' (without materialising B×L×dim×h×w)
        pooled = [torch.einsum("blhw,bdhw->bld", attention, f) / (h * w) for f in (f1, f2)]
        stream_logits = torch.stack([(self.dropout(z) * self.cls_weight[k].to(z.dtype)).sum(-1) + self.cls_bias[k]
                                     for k, z in enumerate(pooled)], dim=1)  # B×2×L
        cross_pooled = cross.mean(dim=(2, 3))
        extras = {"attention": attention, "stream_logits": stream_logits, "cross_pooled": cross_pooled,
                  "label_features": torch.cat(pooled, dim=-1),
                  "features": torch.cat([f1.mean(dim=(2, 3)), f2.mean(dim=(2, 3))], dim=1)}
        if self.auxiliary is not None:
            extras["cross_logits"] = self.auxiliary(cross_pooled)
        return Output(stream_logits.mean(dim=1), extras)


@HEADS.register("concat")
class ConcatHead(Head):
    """Control for two (or more) backbones without cross-attention: global average pool of each map,
    concatenated, dropout, one linear layer. Args: ``dropout`` (0.0)."""

    provides = frozenset({"features"})
    capabilities = frozenset({Capability.SEVERAL_MAPS})

    def __init__(self, in_features: list[int], num_labels: int, dropout: float = 0.0):
        super().__init__()
        self.in_features = _several(in_features, "concat")
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(sum(self.in_features), num_labels)

    def forward(self, maps: list[torch.Tensor]) -> Output:
        check_maps(maps, self.in_features, "concat")
        pooled = torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1)
        return Output(self.classifier(self.dropout(pooled)), {"features": pooled})
