"""Per-label heatmaps of a trained model.

Heads that decompose the image into label features (``lcl``, ``label_query``) return their per-label
spatial attention in ``Output.extras['attention']``: those maps are the heatmaps. For the global-pool
``linear`` head the class activation map is used instead (Zhou et al., "Learning Deep Features for
Discriminative Localization", CVPR 2016): ``CAM_c = w_c · F``, the classifier applied at every location
of the feature map before pooling. The ``bilinear`` head has no native map (its classifier reads
``vec(F Fᵀ/hw)``, statistics of the whole map, not one score per location): it takes Grad-CAM. An
ensemble's map is the weighted mean of its members' maps.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..ensemble import ensemble_heatmaps
from ..errors import CxrlabError, unknown
from ..models.heads.base import Capability


def native_maps(model, fmap, out) -> torch.Tensor | None:
    """The head's own per-label maps B×L×h×w before upsampling (``Head.native_maps``: its ``attention``
    extra, or the linear head's CAM ``relu(w_c · F + b_c)``); None for a head without the native_maps
    capability. (Also the ``maps`` output of an ONNX export, so both backends draw the same heatmaps.)"""
    if Capability.NATIVE_MAPS not in model.head.capabilities:
        return None
    return model.head.native_maps(fmap, out)


@torch.no_grad()
def label_heatmaps(model, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``x`` B×1×H×W in [0, 1] → (probabilities B×L, heatmaps B×L×H×W scaled to [0, 1] per map)."""
    model.eval()
    if hasattr(model, "members"):  # an ensemble (cxrlab.ensemble): the weighted mean of its members' maps
        return ensemble_heatmaps(model, x, label_heatmaps)
    fmap = model.features(x)
    out = model.head(fmap)
    maps = native_maps(model, fmap, out)
    if maps is None:
        # a head may say why it has no native map (bilinear: no per-location classifier)
        note = model.head.heatmap_note or \
            f"head {type(model.head).__name__} gives no spatial maps for heatmaps"
        raise CxrlabError(f"{note} (Grad-CAM works for every head: method gradcam)")
    maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)
    low = maps.amin(dim=(2, 3), keepdim=True)
    high = maps.amax(dim=(2, 3), keepdim=True)
    maps = (maps - low) / (high - low).clamp_min(1e-12)
    return torch.sigmoid(out.logits.float()).cpu().numpy(), maps.cpu().numpy()


class _Logits(torch.nn.Module):
    """The model as ``x -> logits`` (what pytorch-grad-cam differentiates)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def gradcam_maps(model, x: torch.Tensor, label_indices: list[int], method: str = "gradcam") -> np.ndarray:
    """Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017) or Grad-CAM++ (Chattopadhay et al., WACV 2018) through the ``grad-cam``
    package, for any head: the map of label ``label_indices[i]`` for image ``x[i]`` from the gradients of
    its logit at the backbone's output feature map (each backbone's, averaged, for several).
    Returns B×H×W in [0, 1]."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if method not in ("gradcam", "gradcampp"):
        raise unknown("Grad-CAM method", method, ("gradcam", "gradcampp"))
    if len(label_indices) != len(x):
        raise CxrlabError(f"gradcam_maps: {len(x)} images but {len(label_indices)} labels")
    if hasattr(model, "members"):  # an ensemble: the weighted mean of its members' maps, each in [0, 1]
        return sum(float(model.weights[k]) * gradcam_maps(
            member, x, [int(model.member_columns(k)[j]) for j in label_indices], method)
            for k, member in enumerate(model.members))
    backbone = model.backbone
    layers = list(backbone) if isinstance(backbone, torch.nn.ModuleList) else [backbone]
    cam_class = GradCAM if method == "gradcam" else GradCAMPlusPlus
    was_training = model.training
    try:
        with cam_class(model=_Logits(model).eval(), target_layers=layers) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(j)) for j in label_indices])
    finally:
        model.train(was_training)
    return np.asarray(maps, dtype=np.float32)
