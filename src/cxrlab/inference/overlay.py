"""Heatmap post-processing in numpy (no torch): upsampling, scaling to [0, 1], PNG overlays.

Both the PyTorch path and the ONNX Runtime path build their pictures here, so a heatmap looks the
same whichever backend computed the raw maps.
"""
from __future__ import annotations

import io

import numpy as np


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of bilinear resampling along one axis with half-pixel centres
    (``F.interpolate(..., mode="bilinear", align_corners=False)``): coordinates clamped at the border."""
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1)
    low = np.floor(pos).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    return low, high, pos - low


def resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of ``...×h×w`` maps to ``...×H×W`` (as torch's align_corners=False)."""
    maps = np.asarray(maps, dtype=np.float32)
    (y0, y1, wy), (x0, x1, wx) = _axis_weights(maps.shape[-2], size[0]), _axis_weights(maps.shape[-1], size[1])
    rows = maps[..., y0, :] * (1 - wy)[:, None] + maps[..., y1, :] * wy[:, None]
    return (rows[..., x0] * (1 - wx) + rows[..., x1] * wx).astype(np.float32)


def normalise_maps(maps: np.ndarray) -> np.ndarray:
    """Each map (last two axes) scaled to [0, 1] by its own min and max (a flat map becomes 0)."""
    low = maps.min(axis=(-2, -1), keepdims=True)
    high = maps.max(axis=(-2, -1), keepdims=True)
    return ((maps - low) / np.maximum(high - low, 1e-12)).astype(np.float32)


# A map is flat when its max - min on the [0, 1] scale it is drawn at is below one step of the 256-colour
# jet map (it is then drawn in one colour). Measured on test_resnet models (random and demo-trained; an NIH
# PNG and a COVID JPEG): a flat map (a linear head's CAM that ReLU zeroes everywhere, a Grad-CAM whose
# gradients vanish) comes out at exactly 0; every other native or Grad-CAM map at 1.0, since native maps are
# min-max scaled and Grad-CAM's are divided by their maximum. Any threshold in (0, 1) separates them.
FLAT_RANGE = 1 / 256


def map_range(heatmap: np.ndarray, box=None) -> float:
    """max - min of a [0, 1] heatmap, inside ``box`` (top, left, height, width) when given: the padding is
    not drawn, so variation there is no evidence either."""
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if box is not None:
        top, left, height, width = box
        heatmap = heatmap[top:top + height, left:left + width]
    return float(heatmap.max() - heatmap.min()) if heatmap.size else 0.0


def is_flat(heatmap: np.ndarray, box=None) -> bool:
    """Whether the map shows no spatial variation worth a colour (see FLAT_RANGE)."""
    return map_range(heatmap, box) < FLAT_RANGE


def overlay_png(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4, box=None) -> bytes:
    """PNG bytes of a uint8 grey image with a [0, 1] heatmap over it in the ``jet`` colour map.

    ``box``: (top, left, height, width) of the image inside a letterboxed fit; the padding around it is
    left grey (the model saw black there, and a colour would read as a finding)."""
    from matplotlib import colormaps

    grey = np.repeat(np.asarray(image, dtype=np.float32)[..., None] / 255.0, 3, axis=-1)
    colour = colormaps["jet"](np.clip(heatmap, 0.0, 1.0))[..., :3]
    weight = np.full(grey.shape[:2] + (1,), alpha, dtype=np.float32)
    if box is not None:
        top, left, height, width = box
        inside = np.zeros(grey.shape[:2], dtype=bool)
        inside[top:top + height, left:left + width] = True
        weight[~inside] = 0.0
    mixed = (1 - weight) * grey + weight * colour
    return png_bytes(np.round(mixed * 255).astype(np.uint8))


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 grey (H×W) or RGB (H×W×3) array."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
