"""Per-label heatmaps of a trained model.

Heads that decompose the image into label features (``lcl``, ``label_query``) return their per-label
spatial attention in ``Output.extras['attention']``: those maps are the heatmaps. For the global-pool
``linear`` head the class activation map is used instead (Zhou et al., "Learning Deep Features for
Discriminative Localization", CVPR 2016): ``CAM_c = w_c · F``, the classifier applied at every location
of the feature map before pooling.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CxrlabError


@torch.no_grad()
def label_heatmaps(model, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``x`` B×1×H×W in [0, 1] → (probabilities B×L, heatmaps B×L×H×W scaled to [0, 1] per map)."""
    model.eval()
    fmap = model.features(x)
    out = model.head(fmap)
    if "attention" in out.extras:
        maps = out.extras["attention"].float()
    elif hasattr(model.head, "fc"):
        weight, bias = model.head.fc.weight.float(), model.head.fc.bias.float()
        maps = torch.relu(torch.einsum("ld,bdhw->blhw", weight, fmap.float()) + bias[None, :, None, None])
    else:
        raise CxrlabError(f"head {type(model.head).__name__} gives no spatial maps for heatmaps")
    maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)
    low = maps.amin(dim=(2, 3), keepdim=True)
    high = maps.amax(dim=(2, 3), keepdim=True)
    maps = (maps - low) / (high - low).clamp_min(1e-12)
    return torch.sigmoid(out.logits.float()).cpu().numpy(), maps.cpu().numpy()


def write_heatmaps(checkpoint: Path, inputs: list[Path], out_dir: Path, labels: list[str] | None = None,
                   top: int = 3) -> list[Path]:
    """One PNG per image and label: the image with the label's heatmap over it, probability in the title.
    ``labels`` picks labels by name; otherwise each image's ``top`` most probable labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..data.images import read_image
    from .predictor import Predictor, collect_images

    predictor = Predictor(checkpoint)
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
        probs, maps = label_heatmaps(predictor.model, x)
        chosen = [names.index(n) for n in labels] if labels else list(np.argsort(-probs[0])[:top])
        for j in chosen:
            fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
            ax.imshow(image, cmap="gray")
            ax.imshow(maps[0, j], cmap="jet", alpha=0.35, vmin=0, vmax=1)
            ax.set_title(f"{names[j]}: p = {probs[0, j]:.3f}", fontsize=10)
            ax.axis("off")
            target = out_dir / f"{path.stem}_{names[j].replace(' ', '_')}.png"
            fig.savefig(target, bbox_inches="tight")
            plt.close(fig)
            written.append(target)
    return written
