"""Model = timm backbone(s) (feature maps) + a registered head (returns an Output).

One backbone (``model.backbone``): the head receives its B×D×h×w map. Several (``model.backbones``,
e.g. ``[densenet121, {name: resnet50, pretrained: true}]``): every backbone sees the same image and the
head receives the list of their maps, in recipe order; only heads with the ``several_maps`` capability
(``concat``, ``cross_attention``) take them, and they are built with the list of channel counts.
Every head subclasses :class:`cxrlab.models.heads.base.Head`, which declares what it provides.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CxrlabError, unknown
from ..output import Output
from ..registry import HEADS
from .backbone import Backbone, check_backbone_name
from .heads.base import Head

SPEC_KEYS = ("name", "pretrained", "output_stride")


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    pretrained: Any = False
    output_stride: int | None = None


class Backbones(nn.ModuleList):
    """Several backbones applied to the same image: ``forward(x) -> [B×D_k×h_k×w_k, ...]``."""

    @property
    def num_features(self) -> tuple[int, ...]:
        return tuple(b.num_features for b in self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [b(x) for b in self]


class CxrModel(nn.Module):
    """``forward(x: B×1×H×W in [0,1]) -> Output``. ``features`` and ``head`` are usable apart
    (regimes perturb the feature map between them).

    ``features(x)`` is what the head takes: the feature map (a tensor) with one backbone, the list of
    maps (one per backbone, recipe order) with several; ``head(features(x)) == forward(x)`` always.
    """

    def __init__(self, backbone: Backbone | Backbones, head: Head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def num_backbones(self) -> int:
        return len(self.backbone) if isinstance(self.backbone, Backbones) else 1

    def features(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> Output:
        return self.head(self.backbone(x))


def backbone_specs(model_cfg) -> list[BackboneSpec]:
    """The backbones a model section names (a ``ModelConfig`` or its dict, e.g. from a checkpoint's
    JSON): ``model.backbones`` when not empty, else ``[model.backbone]``. Entries of ``backbones`` are
    names or mappings ``{name, pretrained, output_stride}``; missing keys take the section's values."""
    get = model_cfg.get if isinstance(model_cfg, dict) else lambda k, d=None: getattr(model_cfg, k, d)
    pretrained, stride = get("pretrained", False), get("output_stride", None)
    entries = get("backbones", None) or []
    if not isinstance(entries, (list, tuple)):
        raise CxrlabError(f"model.backbones must be a list of backbone names or mappings, got {entries!r}")
    if not entries:
        return [BackboneSpec(get("backbone", "resnet18"), pretrained, stride)]
    specs = []
    for i, entry in enumerate(entries):
        where = f"model.backbones[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict):
            raise CxrlabError(f"{where} must be a backbone name or a mapping with 'name', got {entry!r}")
        for key in entry:
            if key not in SPEC_KEYS:
                raise unknown(f"{where} key", key, SPEC_KEYS)
        if not isinstance(entry.get("name"), str):
            raise CxrlabError(f"{where} lacks a backbone 'name' (got {entry!r})")
        specs.append(BackboneSpec(entry["name"], entry.get("pretrained", pretrained),
                                  entry.get("output_stride", stride)))
    return specs


def check_head(head: str, head_args: dict | None = None, num_backbones: int = 1):
    """The registered head class, after checking that it accepts every key of ``head_args`` and takes
    as many feature maps as there are backbones."""
    head_cls = HEADS.get(head)
    if not (isinstance(head_cls, type) and issubclass(head_cls, Head)):
        raise CxrlabError(f"model.head {head!r} is registered as {head_cls!r}, which is not a subclass of "
                          "cxrlab.models.heads.base.Head (the class that declares what a head provides)")
    accepted = [p for p in inspect.signature(head_cls).parameters if p not in ("in_features", "num_labels")]
    for key in head_args or {}:
        if key not in accepted:
            raise unknown(f"model.head_args key for head {head!r}", key, accepted)
    several = head_cls.takes_several_maps()
    if num_backbones > 1 and not several:
        takers = heads_where(lambda h: h.takes_several_maps())
        raise CxrlabError(f"model.head {head!r} takes one feature map but model.backbones names {num_backbones}; "
                          f"use a head for several maps ({', '.join(takers)}) or one backbone")
    if num_backbones == 1 and several:
        raise CxrlabError(f"model.head {head!r} needs several backbones: set model.backbones, e.g. "
                          "[resnet18, resnet18] (model.backbone gives one)")
    return head_cls


def heads_where(test) -> list[str]:
    """The registered heads whose class passes ``test`` (for messages that name the heads that fit)."""
    return [n for n in HEADS.names() if test(HEADS.get(n))]


def check_model(model_cfg) -> list[BackboneSpec]:
    """Check a model section without building anything (names, spec keys, head and its arguments)."""
    specs = backbone_specs(model_cfg)
    for spec in specs:
        check_backbone_name(spec.name)
    get = model_cfg.get if isinstance(model_cfg, dict) else lambda k, d=None: getattr(model_cfg, k, d)
    check_head(get("head", "linear"), get("head_args", None) or {}, len(specs))
    return specs


def build_model(backbone: str | list, head: str, num_labels: int, pretrained: bool | str = False,
                drop_rate: float = 0.0, head_args: dict | None = None, output_stride: int | None = None,
                image_size: int | None = None) -> CxrModel:
    """``backbone`` is one timm name, or a list (names or ``{name, pretrained, output_stride}``) for
    several backbones; ``pretrained`` and ``output_stride`` are the defaults of the list's entries.
    ``image_size``: transformer backbones (ViT, EVA, Swin) are built for it (None: their own size)."""
    if isinstance(backbone, str):
        specs = [BackboneSpec(backbone, pretrained, output_stride)]
    else:
        specs = backbone_specs({"backbones": list(backbone), "pretrained": pretrained,
                                "output_stride": output_stride})
    head_cls = check_head(head, head_args, len(specs))
    nets = [Backbone(s.name, pretrained=s.pretrained, drop_rate=drop_rate, output_stride=s.output_stride,
                     image_size=image_size) for s in specs]
    if len(nets) == 1:
        net, in_features = nets[0], nets[0].num_features
    else:
        net = Backbones(nets)
        in_features = list(net.num_features)
    return CxrModel(net, head_cls(in_features, num_labels, **dict(head_args or {})))


def build_from_config(model_cfg, num_labels: int, load_weights: bool = True, weight_names=None,
                      image_size: int | None = None) -> CxrModel:
    """The model a recipe's model section (``ModelConfig`` or its dict) describes. ``load_weights=False``
    skips pretrained weights (a checkpoint's own weights, and its recorded normalisation, follow).
    ``weight_names``: the names of the weights the model will load (a checkpoint's); a head class with
    ``args_for_weights`` completes its head_args from its own (``head.*``), so a checkpoint saved before
    one of its defaults changed is rebuilt as it was trained."""
    specs = backbone_specs(model_cfg)
    get = model_cfg.get if isinstance(model_cfg, dict) else lambda k, d=None: getattr(model_cfg, k, d)
    entries = [{"name": s.name, "pretrained": s.pretrained if load_weights else False,
                "output_stride": s.output_stride} for s in specs]
    head, head_args = get("head", "linear"), dict(get("head_args", None) or {})
    if weight_names is not None:
        head_args = HEADS.get(head).args_for_weights(
            head_args, [n[len("head."):] for n in weight_names if n.startswith("head.")])
    return build_model(entries if len(entries) > 1 else entries[0]["name"], head, num_labels,
                       pretrained=entries[0]["pretrained"] if len(entries) == 1 else False,
                       drop_rate=get("drop_rate", 0.0) or 0.0, head_args=head_args,
                       output_stride=entries[0]["output_stride"] if len(entries) == 1 else None,
                       image_size=image_size)


def describe_backbones(model_cfg) -> list[tuple[str, int | None]]:
    """``[(name, output_stride), ...]``: what fixes the shapes of a model's backbone weights and maps
    (compared on resume: a checkpoint's list must be the recipe's)."""
    return [(s.name, s.output_stride) for s in backbone_specs(model_cfg)]
