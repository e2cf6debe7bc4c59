"""timm backbones as feature-map extractors for one-channel chest X-rays.

timm is the backbone registry: any ``timm.list_models()`` name works. One-channel input uses timm's
own ``in_chans=1`` adaptation (pretrained RGB stem weights are summed over colour channels).

Input normalisation: a pretrained backbone gets the mean/std its weights were trained with (timm's
``pretrained_cfg``, averaged over the three colour channels to one grey value: ImageNet 0.449/0.226,
ViT/Inception-style 0.5/0.5); a randomly initialised one the grey ImageNet default. The values used are
buffers of the module (``input_mean``, ``input_std``), so checkpoints carry them and a rebuilt model
normalises exactly as the trained one did.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CxrlabError, unknown
from .weight_layouts import load_into

log = logging.getLogger(__name__)

# Grey-level equivalent of the ImageNet normalisation (the default without pretrained weights).
GRAY_MEAN = 0.449
GRAY_STD = 0.226
OUTPUT_STRIDES = (8, 16, 32)


class Backbone(nn.Module):
    """``forward(x: B×1×H×W in [0,1]) -> B×D×h×w`` feature map; ``num_features`` is D.

    Vision transformers' patch tokens are laid back on their grid (prefix tokens dropped) and NHWC
    backbones (swin, mambaout) are permuted, so every head sees a B×D×h×w map whatever the backbone.
    ``output_stride`` (8, 16 or 32; None = the architecture's own) is passed to timm, which dilates the
    last stages instead of striding where the architecture supports it (resnets, convnexts,
    efficientnets, ...); elsewhere it is an error naming ``model.output_stride``.
    """

    def __init__(self, name: str, pretrained: bool | str = False, drop_rate: float = 0.0,
                 output_stride: int | None = None, image_size: int | None = None):
        super().__init__()
        import timm

        check_backbone_name(name)
        kwargs = dict(num_classes=0, global_pool="", in_chans=1, drop_rate=drop_rate)
        if output_stride is not None:
            if output_stride not in OUTPUT_STRIDES:
                raise CxrlabError(f"model.output_stride must be one of {', '.join(map(str, OUTPUT_STRIDES))} "
                                  f"or null, got {output_stride!r}")
            kwargs["output_stride"] = int(output_stride)
        use_pretrained = _wants_pretrained(pretrained)
        local = None
        if isinstance(pretrained, str) and use_pretrained and pretrained not in ("true", "True", "timm"):
            local = Path(pretrained).expanduser()
            if not local.is_file():
                raise CxrlabError(f"pretrained weights file not found: {local}")
        if image_size is not None:  # transformers (ViT, EVA, Swin) are built for the recipe's image size
            kwargs["img_size"] = int(image_size)
        try:
            try:
                self.net = timm.create_model(name, pretrained=use_pretrained and local is None, **kwargs)
            except TypeError as exc:
                if "img_size" not in str(exc):
                    raise
                kwargs.pop("img_size")  # a CNN: any size
                self.net = timm.create_model(name, pretrained=use_pretrained and local is None, **kwargs)
        except TypeError as exc:
            if output_stride is not None and "output_stride" in str(exc):
                raise CxrlabError(f"model.output_stride={output_stride}: backbone {name!r} does not support an "
                                  "output stride in timm (it does for resnets, convnexts, efficientnets, ...); "
                                  "leave model.output_stride unset for it") from None
            raise
        except Exception as exc:  # noqa: BLE001 - the hub raises its own error types
            if not isinstance(exc, (OSError, RuntimeError, ValueError)):
                raise
            if use_pretrained:
                cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
                raise CxrlabError(
                    f"could not get pretrained weights for {name!r} ({exc.__class__.__name__}: {exc}). "
                    f"Offline, put the weights in the Hugging Face cache ({cache}/hub, as timm downloads "
                    f"them when online) or pass a local file: model.pretrained=/path/to/{name}.safetensors"
                ) from exc
            raise
        if local is not None:
            # a local file in timm's or a published encoder's key layout (weight_layouts); a corrupt file or
            # a pickle needing code is refused by safetensors / torch's weights-only unpickler: nothing ran
            self.layout = load_into(self.net, local, name)
        self.name = name
        self.num_features = self.net.num_features
        self.num_prefix_tokens = getattr(self.net, "num_prefix_tokens", 0)
        self.output_fmt = getattr(self.net, "output_fmt", "NCHW")
        mean, std = input_normalisation(self.net, use_pretrained)
        self.normalisation = "pretrained_cfg" if use_pretrained else "grey ImageNet default"
        # worth a line when it departs from the default (every predict/evaluate rebuilds the model)
        log.log(logging.INFO if use_pretrained else logging.DEBUG, "backbone %s: input mean %.4f, std %.4f (%s)",
                name, mean, std, self.normalisation)
        self.register_buffer("input_mean", torch.tensor(mean))
        self.register_buffer("input_std", torch.tensor(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)
        feats = self.net.forward_features(x)
        if feats.ndim == 3:  # transformer tokens B×N×D -> B×D×h×w
            tokens = feats[:, self.num_prefix_tokens:]
            side = int(round(tokens.shape[1] ** 0.5))
            if side * side != tokens.shape[1]:
                raise CxrlabError(f"backbone {self.name}: cannot lay {tokens.shape[1]} tokens on a square grid")
            feats = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
        elif feats.ndim == 4 and (self.output_fmt == "NHWC" or (
                feats.shape[1] != self.num_features and feats.shape[-1] == self.num_features)):
            feats = feats.permute(0, 3, 1, 2)  # NHWC backbones
        return feats

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the normalisation was recorded all used the grey default
        for key, value in (("input_mean", GRAY_MEAN), ("input_std", GRAY_STD)):
            state_dict.setdefault(prefix + key, torch.tensor(value))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def input_normalisation(net: nn.Module, pretrained: bool) -> tuple[float, float]:
    """One grey ``(mean, std)``: the pretrained weights' own (colour channels averaged) when pretrained,
    else the grey ImageNet default."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    if not pretrained or "mean" not in cfg or "std" not in cfg:
        return GRAY_MEAN, GRAY_STD
    mean, std = cfg["mean"], cfg["std"]
    mean = [mean] if isinstance(mean, (int, float)) else list(mean)
    std = [std] if isinstance(std, (int, float)) else list(std)
    return float(sum(mean) / len(mean)), float(sum(std) / len(std))


def _wants_pretrained(pretrained: bool | str) -> bool:
    if isinstance(pretrained, str):
        return pretrained.strip().lower() not in ("", "false", "no", "0", "none")
    return bool(pretrained)


def check_backbone_name(name: str) -> None:
    """Raise a CxrlabError suggesting a close name unless timm knows the architecture."""
    import timm

    if not isinstance(name, str) or (not timm.list_models(name) and not timm.list_models(name.split(".")[0])):
        raise unknown("backbone", str(name), _common_backbones())


def _common_backbones() -> list[str]:
    return ["resnet18", "resnet50", "resnet101", "densenet121", "convnext_tiny", "efficientnet_b0",
            "vit_small_patch16_224", "swin_tiny_patch4_window7_224"]
