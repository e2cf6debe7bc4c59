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

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CxrlabError

METHODS = ("native", "gradcam", "gradcampp")


def native_maps(model, fmap, out) -> torch.Tensor | None:
    """The head's own per-label maps B×L×h×w before upsampling: its ``attention`` extra, or for a head
    with a linear classifier ``fc`` on one pooled map the CAM ``relu(w_c · F + b_c)``; None otherwise.
    (Also the ``maps`` output of an ONNX export, so both backends draw the same heatmaps.)"""
    if "attention" in out.extras:
        return out.extras["attention"].float()
    fc = getattr(model.head, "fc", None)
    if isinstance(fc, torch.nn.Linear) and torch.is_tensor(fmap) and fmap.ndim == 4:
        cam = torch.einsum("ld,bdhw->blhw", fc.weight.float(), fmap.float())  # two operands (ONNX-friendly)
        return torch.relu(cam + fc.bias.float()[None, :, None, None])
    return None


@torch.no_grad()
def label_heatmaps(model, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``x`` B×1×H×W in [0, 1] → (probabilities B×L, heatmaps B×L×H×W scaled to [0, 1] per map)."""
    model.eval()
    if hasattr(model, "members"):  # an ensemble (cxrlab.ensemble): the weighted mean of its members' maps
        from ..ensemble import ensemble_heatmaps

        return ensemble_heatmaps(model, x, label_heatmaps)
    fmap = model.features(x)
    out = model.head(fmap)
    maps = native_maps(model, fmap, out)
    if maps is None:
        # a head may say why it has no native map (bilinear: no per-location classifier)
        note = getattr(model.head, "heatmap_note", None) or \
            f"head {type(model.head).__name__} gives no spatial maps for heatmaps"
        raise CxrlabError(f"{note} (Grad-CAM works for every head: method gradcam)")
    maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)
    low = maps.amin(dim=(2, 3), keepdim=True)
    high = maps.amax(dim=(2, 3), keepdim=True)
    maps = (maps - low) / (high - low).clamp_min(1e-12)
    return torch.sigmoid(out.logits.float()).cpu().numpy(), maps.cpu().numpy()


def write_heatmaps(checkpoint: Path, inputs: list[Path], out_dir: Path, labels: list[str] | None = None,
                   top: int = 3, method: str = "native") -> list[Path]:
    """One PNG per image and label: the image with the label's heatmap over it, probability in the title.
    ``labels`` picks labels by name; otherwise each image's ``top`` most probable labels. ``method``:
    ``native`` (the head's attention or CAM), ``gradcam`` or ``gradcampp`` (any head)."""
    if method not in METHODS:
        from ..errors import unknown

        raise unknown("heatmap method", method, METHODS)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..data.images import read_image
    from ..data.sources.generic import collect_images
    from .predictor import Predictor

    predictor = Predictor.from_checkpoint(checkpoint)
    names = predictor.label_names
    if labels:
        unknown_names = [n for n in labels if n not in names]
        if unknown_names:
            from ..errors import unknown

            raise unknown("label", unknown_names[0], names)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in collect_images(inputs):
        image = predictor.fit_size(read_image(path))
        x = torch.from_numpy(image).float().div_(255.0)[None, None].to(predictor.device)
        if method == "native":
            probs, maps = label_heatmaps(predictor.model, x)
        else:
            probs = predictor.predict_cached(image[None])
        chosen = [names.index(n) for n in labels] if labels else list(np.argsort(-probs[0])[:top])
        if method != "native" and chosen:
            cams = gradcam_maps(predictor.model, x.expand(len(chosen), -1, -1, -1), chosen, method)
            maps = _scatter(cams, chosen, len(names))[None]
        for j in chosen:
            fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
            ax.imshow(image, cmap="gray")
            ax.imshow(maps[0, j], cmap="jet", alpha=0.35, vmin=0, vmax=1)
            ax.set_title(f"{names[j]}: p = {probs[0, j]:.3f} ({method})", fontsize=10)
            ax.axis("off")
            suffix = "" if method == "native" else f"_{method}"
            target = out_dir / f"{path.stem}_{names[j].replace(' ', '_')}{suffix}.png"
            fig.savefig(target, bbox_inches="tight")
            plt.close(fig)
            written.append(target)
    return written


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
        from ..errors import unknown

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


def _scatter(maps: np.ndarray, chosen: list[int], num_labels: int) -> np.ndarray:
    """Maps of the chosen labels (K×H×W) placed at their label index in an L×H×W array."""
    out = np.zeros((num_labels,) + maps.shape[-2:], dtype=np.float32)
    out[chosen] = maps
    return out
