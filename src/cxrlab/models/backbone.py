"""timm backbones as feature-map extractors for one-channel chest X-rays.

timm is the backbone registry: any ``timm.list_models()`` name works. One-channel input uses timm's
own ``in_chans=1`` adaptation (pretrained RGB stem weights are summed over colour channels).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CxrlabError, unknown

# Grey-level equivalent of the ImageNet normalisation that pretrained timm weights expect.
GRAY_MEAN = 0.449
GRAY_STD = 0.226


class Backbone(nn.Module):
    """``forward(x: B×1×H×W in [0,1]) -> B×D×h×w`` feature map; ``num_features`` is D.

    Vision transformers' patch tokens are laid back on their grid (prefix tokens dropped), so every
    head sees a spatial map whatever the backbone.
    """

    def __init__(self, name: str, pretrained: bool | str = False, drop_rate: float = 0.0):
        super().__init__()
        import timm

        check_backbone_name(name)
        kwargs = dict(num_classes=0, global_pool="", in_chans=1, drop_rate=drop_rate)
        use_pretrained = bool(pretrained)
        if isinstance(pretrained, str) and pretrained not in ("true", "True", "timm"):
            path = Path(pretrained).expanduser()
            if not path.is_file():
                raise CxrlabError(f"pretrained weights file not found: {path}")
            kwargs["pretrained_cfg_overlay"] = dict(file=str(path))
        try:
            self.net = timm.create_model(name, pretrained=use_pretrained, **kwargs)
        except (OSError, RuntimeError, ValueError) as exc:
            if use_pretrained and "pretrained_cfg_overlay" not in kwargs:
                cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
                raise CxrlabError(
                    f"could not get pretrained weights for {name!r} ({exc.__class__.__name__}: {exc}). "
                    f"Offline, put the weights in the Hugging Face cache ({cache}/hub, as timm downloads "
                    f"them when online) or pass a local file: model.pretrained=/path/to/{name}.safetensors"
                ) from exc
            raise
        self.num_features = self.net.num_features
        self.num_prefix_tokens = getattr(self.net, "num_prefix_tokens", 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - GRAY_MEAN) / GRAY_STD
        feats = self.net.forward_features(x)
        if feats.ndim == 3:  # transformer tokens B×N×D -> B×D×h×w
            tokens = feats[:, self.num_prefix_tokens:]
            side = int(round(tokens.shape[1] ** 0.5))
            if side * side != tokens.shape[1]:
                raise CxrlabError(f"cannot lay {tokens.shape[1]} tokens on a square grid")
            feats = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
        elif feats.ndim == 4 and feats.shape[1] != self.num_features and feats.shape[-1] == self.num_features:
            feats = feats.permute(0, 3, 1, 2)  # NHWC backbones
        return feats


def check_backbone_name(name: str) -> None:
    """Raise a CxrlabError suggesting a close name unless timm knows the architecture."""
    import timm

    if not timm.list_models(name) and not timm.list_models(name.split(".")[0]):
        raise unknown("backbone", name, _common_backbones())


def _common_backbones() -> list[str]:
    return ["resnet18", "resnet50", "resnet101", "densenet121", "convnext_tiny", "efficientnet_b0",
            "vit_small_patch16_224", "swin_tiny_patch4_window7_224"]
