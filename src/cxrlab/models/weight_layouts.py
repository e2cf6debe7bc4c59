"""Local pretrained weights in the key layouts foundation encoders are published in, mapped onto a timm backbone.

``model.pretrained=/path/weights.safetensors`` (or ``.pth`` / ``.bin``, read by torch's weights-only
loader) is read, its layout recognised from its keys, and its tensors renamed to the timm model's:

- ``timm``: timm's own names (EVA-X's eva weights, Medical MAE's ViT, any timm checkpoint), also under a
  ``model.`` / ``module.`` / ``encoder.`` prefix or a ``{"model": ...}`` wrapper; MAE's decoder and mask
  token are left out.
- ``hf_dinov2``: Hugging Face transformers' Dinov2 (RAD-DINO): ``embeddings.*``,
  ``encoder.layer.N.attention.attention.query/key/value`` (transformers 4) or ``attention.q_proj/...``
  (transformers 5), ``layer_scale1.lambda1``, ``layernorm``; for ``vit_*_dinov2`` backbones.
- ``open_clip``: an open_clip model whose vision tower is a timm ViT (BiomedCLIP): ``visual.trunk.*``
  kept, the text tower and projection left out.

Then, whatever the layout: separate q/k/v projections are merged into timm's fused ``qkv`` (or split
from it), a classifier the backbone does not have is left out, absolute position embeddings are resampled
to the recipe's grid (``timm.layers.resample_abs_pos_embed``), and 3-channel input convolutions are summed
to 1 channel (a grey image x gives the same response as the RGB image (x, x, x)). What is still missing or
left over is refused in one line naming the first keys; a shape that cannot be adapted names its key.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import CxrlabError
from .parts import key_mismatch

LAYOUTS = ("timm", "hf_dinov2", "open_clip")
WRAPPERS = ("state_dict", "model", "module", "model_state", "teacher")  # {"model": state_dict} and the like
PREFIXES = ("module.", "model.", "encoder.", "backbone.", "dinov2.", "vit.")
# in published files but not part of a feature extractor: MAE's decoder and mask token, DINOv2's mask
# token, EVA's rotary tables (rebuilt by timm), open_clip's text tower
IGNORED = re.compile(r"^(decoder|mask_token|rope\.|pooler\.|text\.|logit_scale|head\.proj|classifier\.)")

_HF_DINOV2 = [  # (pattern, replacement) on transformers' Dinov2 names, after any dinov2. prefix
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.register_tokens$", "reg_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.query\.", r"blocks.\1.attn.q_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.key\.", r"blocks.\1.attn.k_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.value\.", r"blocks.\1.attn.v_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.", r"blocks.\1.attn.\2_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.(norm1|norm2|mlp)\.", r"blocks.\1.\2."),
    (r"^layernorm\.", "norm."),
]


def read_weights(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file by name (unwrapped from ``{"model": {...}}`` and the like)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # lazy: start-up time

            state = load_file(str(path))
        else:  # torch's weights-only unpickler: tensors and plain containers, no code
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - safetensors and torch.load raise their own error types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "Weights only load failed" in first:  # torch's long advice to unpickle anyway: not ours to give
            reason = "it holds objects other than tensors, which the weights-only loader refuses"
        elif isinstance(exc, (KeyError, EOFError, pickle.UnpicklingError)):  # KeyError: 101 for a text file
            reason = "not a PyTorch (torch.save) or safetensors file"
        else:
            reason = f"{exc.__class__.__name__}: {first[:300]}"
        raise CxrlabError(f"model.pretrained={path}: cannot load weights for {name!r} from it ({reason}); give a "
                          ".safetensors file (or a plain tensor state dict) of this backbone") from exc
    while isinstance(state, dict) and not any(torch.is_tensor(v) for v in state.values()):
        inner = next((state[k] for k in WRAPPERS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise CxrlabError(f"model.pretrained={path}: holds no state dict of tensors for {name!r}")
    odd = next((k for k in state if not isinstance(k, str)), None)
    if odd is not None:
        raise CxrlabError(f"model.pretrained={path}: not a state dict: its keys are not parameter names "
                          f"(e.g. {odd!r})")
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def detect_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith("visual.trunk.") for k in keys):
        return "open_clip"
    if any(re.match(r"^(\w+\.)?encoder\.layer\.\d+\.", k) for k in keys) and any("embeddings." in k for k in keys):
        return "hf_dinov2"
    return "timm"


def to_timm_names(state: dict, layout: str) -> dict:
    """Rename a state dict of ``layout`` to timm's names (q/k/v still apart where the file has them so)."""
    if layout == "open_clip":
        return {k[len("visual.trunk."):]: v for k, v in state.items() if k.startswith("visual.trunk.")}
    state = _strip_prefixes(state)
    if layout == "hf_dinov2":  # Dinov2Model, or the dinov2. inside Dinov2ForImageClassification
        out = {}
        for key, value in state.items():
            key = key.removeprefix("dinov2.")
            for pattern, repl in _HF_DINOV2:
                new, n = re.subn(pattern, repl, key)
                if n:
                    key = new
                    break
            out[key] = value
        return out
    return state


def _strip_prefixes(state: dict) -> dict:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def fit_to(net: nn.Module, state: dict, where: str) -> dict:
    """``state`` (timm names) adapted to ``net``'s own state dict: q/k/v merged or split, classifier and
    decoder left out, position embeddings resampled, RGB input convolutions summed; a mismatch refused."""
    own = net.state_dict()
    state = _qkv(dict(state), own)
    classifier = (getattr(net, "pretrained_cfg", None) or {}).get("classifier")
    classifiers = [classifier] if isinstance(classifier, str) else list(classifier or [])
    if "norm.weight" in own and "norm.weight" not in state and "fc_norm.weight" in state:
        # a checkpoint fine-tuned with global pooling (MAE) keeps its final norm as fc_norm
        state["norm.weight"], state["norm.bias"] = state.pop("fc_norm.weight"), state.pop("fc_norm.bias")
    for key in list(state):
        if key not in own and (IGNORED.match(key) or key.startswith("fc_norm.")
                               or any(key == c or key.startswith(c + ".") for c in classifiers + ["head"])):
            del state[key]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CxrlabError(f"{where}: {key_mismatch(missing, unexpected)}")
    for key, target in own.items():
        value = state[key]
        if key.endswith("pos_embed") and value.ndim == 3 and value.shape != target.shape:
            value = _resample_pos_embed(net, value, target, where)
        elif value.ndim == 4 and target.ndim == 4 and value.shape[1] == 3 and target.shape[1] == 1 \
                and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]:
            value = value.sum(dim=1, keepdim=True)
        if value.shape != target.shape:
            raise CxrlabError(f"{where}: {key} has shape {tuple(value.shape)} in the file but {tuple(target.shape)} "
                              "in the backbone (another size of the same family?)")
        state[key] = value.to(target.dtype)
    return state


def _qkv(state: dict, own: dict) -> dict:
    """Merge ``P.q_proj/k_proj/v_proj`` into ``P.qkv`` (or the reverse) where the model wants the other form.
    A key bias adds the same q·b to every logit of a query, which softmax ignores, so a model without one
    (timm's eva: q_bias and v_bias only) takes the others."""
    prefixes = {k[:-len(".q_proj.weight")] for k in state if k.endswith(".q_proj.weight")}
    for p in prefixes:
        if f"{p}.qkv.weight" not in own:
            continue
        parts = [state.pop(f"{p}.{c}_proj.weight") for c in "qkv"]
        state[f"{p}.qkv.weight"] = torch.cat(parts)
        biases = [state.pop(f"{p}.{c}_proj.bias", None) for c in "qkv"]
        if f"{p}.qkv.bias" in own:
            state[f"{p}.qkv.bias"] = torch.cat([b if b is not None else torch.zeros(len(w))
                                                for b, w in zip(biases, parts)])
        elif f"{p}.q_bias" in own:
            dim = len(parts[0])
            state[f"{p}.q_bias"] = biases[0] if biases[0] is not None else torch.zeros(dim)
            state[f"{p}.v_bias"] = biases[2] if biases[2] is not None else torch.zeros(dim)
    fused = {k[:-len(".qkv.weight")] for k in state if k.endswith(".qkv.weight")}
    for p in fused:
        if f"{p}.q_proj.weight" not in own:
            continue
        for c, w in zip("qkv", state.pop(f"{p}.qkv.weight").chunk(3)):
            state[f"{p}.{c}_proj.weight"] = w
        bias = state.pop(f"{p}.qkv.bias", None)
        biases = bias.chunk(3) if bias is not None else [state.pop(f"{p}.{c}_bias", None) for c in "qkv"]
        for c, b in zip("qkv", biases):
            if b is not None and f"{p}.{c}_proj.bias" in own:
                state[f"{p}.{c}_proj.bias"] = b
    return state


def _resample_pos_embed(net: nn.Module, value: torch.Tensor, target: torch.Tensor, where: str) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed  # lazy: start-up time (timm)

    grid = list(getattr(getattr(net, "patch_embed", None), "grid_size", ()) or ())
    prefix = target.shape[1] - (grid[0] * grid[1] if len(grid) == 2 else 0)
    old = value.shape[1] - prefix
    side = int(round(old ** 0.5))
    if len(grid) != 2 or prefix < 0 or side * side != old:
        raise CxrlabError(f"{where}: cannot resample pos_embed of shape {tuple(value.shape)} to {tuple(target.shape)}")
    return resample_abs_pos_embed(value, new_size=grid, old_size=[side, side], num_prefix_tokens=prefix)


def load_into(net: nn.Module, path: Path, name: str) -> str:
    """Load the weights file ``path`` into the timm model ``net`` (backbone ``name``); returns the layout."""
    path = Path(path)
    state = read_weights(path, name)
    layout = detect_layout(state)
    where = f"model.pretrained={path} ({layout} layout) does not fit backbone {name!r}"
    net.load_state_dict(fit_to(net, to_timm_names(state, layout), where), strict=True)
    return layout
