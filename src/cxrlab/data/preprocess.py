"""The one image-to-input path: an :class:`~cxrlab.model_card.InputSpec` and a file (or an image already
in memory) -> the uint8 ``size``×``size`` image a model takes.

``prepare`` stores it in the training cache, and every inference path feeds it to the model: checkpoint
and ONNX predict, serve, evaluate, calibrate, heatmap and the export's parity check. So a model always
sees the pixels its training cache held, whichever backend runs it.

A file is decoded by :func:`cxrlab.data.images.decode` for the fit: 8-bit images stay uint8 (no float
round trip), and a JPEG bigger than ``DRAFT_GAP × size`` is decoded at a reduced DCT scale (Pillow's
draft mode, 4-60× less decoding for 1-3k px films; within ``images.TOLERANCE`` of a full decode). The
output geometry (scaled size, padding) comes from the file's full size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CxrlabError
from ..model_card import RESIZE_MODES, InputSpec
from .images import decode
from .records import Records


def preprocess(spec: InputSpec, source) -> np.ndarray:
    """``source`` (a path, or a float [0, 1] / uint8 H×W array) as the uint8 ``spec.size``² model input."""
    if isinstance(source, np.ndarray):
        if source.ndim != 2:
            raise CxrlabError(f"expected a 2-D grey image, got shape {source.shape}")
        return fit_image(source, spec.size, spec.resize)
    return preprocess_file(spec, source)[0]


def preprocess_file(spec: InputSpec, path) -> tuple[np.ndarray, tuple[int, int]]:
    """(the model input of the file at ``path``, the decoded image's full H×W, e.g. for
    :func:`content_box`)."""
    image, shape = decode(Path(path), fit=(spec.size, spec.resize), uint8=True)
    return fit_image(image, spec.size, spec.resize, shape=shape), shape


def preprocess_record(spec: InputSpec, records: Records, row: int) -> np.ndarray:
    """Row ``row`` of a source: its file through :func:`preprocess`, or a custom reader's array (the
    synthetic source paints arrays) fitted the same way."""
    if records.reader is None:
        return preprocess(spec, records.meta["path"].iloc[row])
    return preprocess(spec, np.asarray(records.read(row)))


def fit_image(image: np.ndarray, size: int, mode: str = "pad", shape: tuple[int, int] | None = None) -> np.ndarray:
    """A float [0, 1] (or uint8) H×W image as uint8 ``size``×``size``, aspect ratio kept.

    ``pad`` (the default) scales the long side to ``size`` and centres the image on black, so nothing
    of the chest is cut; ``crop`` scales the short side to ``size`` and cuts the centre. Resizing is
    Pillow's antialiased bilinear filter (no aliasing when shrinking a 3000-px film to 224 px).
    ``shape``: the full image's H×W when ``image`` is a reduced decode of it (JPEG draft mode); the
    scaled size and padding then come from it, as for the full image.
    """
    from PIL import Image

    if mode not in RESIZE_MODES:
        raise CxrlabError(f"unknown resize mode {mode!r} (valid: {', '.join(RESIZE_MODES)})")
    if image.dtype != np.uint8:
        image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    h, w = shape or image.shape
    if (h, w) == (size, size) == image.shape:
        return np.ascontiguousarray(image)
    new_h, new_w = scaled_size(h, w, size, mode)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR,
                                                        reducing_gap=3.0))
    out = np.zeros((size, size), dtype=np.uint8)
    if mode == "pad":
        top, left, _, _ = content_box(h, w, size, mode)
        out[top:top + new_h, left:left + new_w] = resized
    else:
        top, left = (new_h - size) // 2, (new_w - size) // 2
        out[:] = resized[top:top + size, left:left + size]
    return out


def scaled_size(h: int, w: int, size: int, mode: str = "pad") -> tuple[int, int]:
    """(height, width) an H×W image is scaled to before it is padded or cut to ``size``²."""
    scale = size / (max(h, w) if mode == "pad" else min(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def content_box(h: int, w: int, size: int, mode: str = "pad") -> tuple[int, int, int, int]:
    """(top, left, height, width) of the image inside its ``size``² fit; the rest is padding (pad mode
    only: a crop fills the whole square)."""
    if mode != "pad":
        return 0, 0, size, size
    new_h, new_w = scaled_size(h, w, size, mode)
    return (size - new_h) // 2, (size - new_w) // 2, new_h, new_w
