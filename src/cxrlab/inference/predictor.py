"""Probabilities from a trained model for images in memory or on disk.

``Predictor`` wraps any model that returns an ``Output`` (one built in your own loop, or one loaded from
a checkpoint) with what inference must know of training: the label names, per-label thresholds and how
the training cache fitted images to the input size.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CxrlabError


class Predictor:
    """``predict(images) -> probabilities`` (N×L numpy) for a model in eval mode.

    ``images`` are float arrays in [0, 1] (or uint8) of any size; they are fitted to ``image_size``
    the way the prepared cache fitted the training images (``resize`` pad or crop). A per-label
    ``temperature`` (from ``cxrlab calibrate``) divides the logits, as the ONNX export and the server do.
    """

    def __init__(self, model: nn.Module, label_names, thresholds=None, image_size: int = 224,
                 resize: str = "pad", device: str | None = None, info: dict | None = None, temperature=None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.label_names = list(label_names)
        self.thresholds = np.asarray(thresholds if thresholds is not None else [0.5] * len(self.label_names),
                                     dtype=np.float64)
        if self.thresholds.shape != (len(self.label_names),):
            raise CxrlabError(f"{len(self.label_names)} labels but {self.thresholds.size} thresholds")
        self.image_size = int(image_size)
        self.resize = resize
        self.info = info or {}
        self.temperature = None if temperature is None else torch.as_tensor(temperature, dtype=torch.float32)

    @classmethod
    def from_checkpoint(cls, checkpoint: Path, device: str | None = None, calibrated: bool = True) -> "Predictor":
        """The model of a checkpoint folder (or a run folder: its best checkpoint) with its thresholds;
        ``calibrated=False`` leaves out a temperature from ``cxrlab calibrate`` (to refit it)."""
        from ..checkpoint import load_model

        from .calibrate import scaled_thresholds

        model, info = load_model(Path(checkpoint))
        data = info["recipe"]["data"]
        temperature = info.get("temperature") if calibrated else None
        thresholds = info.get("thresholds")
        if temperature is not None and thresholds is not None:  # stored unscaled: see inference/calibrate.py
            thresholds = scaled_thresholds(thresholds, temperature)
        return cls(model, info["labels"], thresholds, image_size=int(data["image_size"]),
                   resize=data.get("resize", "pad"), device=device, info=info, temperature=temperature)

    def fit_size(self, image: np.ndarray) -> np.ndarray:
        from ..data.cache import fit_image

        return fit_image(image, self.image_size, self.resize)

    def predict(self, images: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Probabilities for in-memory images (float [0, 1] or uint8, any size)."""
        return self._predict_batches(
            np.stack([self.fit_size(im) for im in images[start:start + batch_size]])
            for start in range(0, len(images), batch_size))

    def predict_files(self, paths: list[Path], batch_size: int = 32, workers: int | None = None) -> np.ndarray:
        """Probabilities for image files (PNG, JPEG, DICOM)."""
        from ..data.images import read_image

        paths = list(paths)
        return self.predict_read(lambda i: read_image(paths[i]), len(paths), batch_size, workers)

    def predict_read(self, read, n: int, batch_size: int = 32, workers: int | None = None) -> np.ndarray:
        """Probabilities for images ``read(0) .. read(n-1)``, decoded and resized in ``workers`` processes
        batch by batch: memory holds one batch of full-size images at a time, however many there are."""
        from torch.utils.data import DataLoader

        workers = min(4, os.cpu_count() or 1) if workers is None else workers
        loader = DataLoader(_Fitted(read, n, self.image_size, self.resize), batch_size=batch_size,
                            num_workers=workers if n > batch_size else 0)
        return self._predict_batches(batch.numpy() for batch in loader)

    def predict_cached(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Probabilities for images already at the input size (uint8 N×S×S, e.g. rows of a prepared cache)."""
        return self._predict_batches(images[start:start + batch_size] for start in range(0, len(images), batch_size))

    @torch.no_grad()
    def _predict_batches(self, batches) -> np.ndarray:
        out = []
        for chunk in batches:
            x = torch.as_tensor(np.asarray(chunk)).float().div_(255.0).unsqueeze(1).to(self.device)
            logits = self.model(x).logits.float()
            if self.temperature is not None:
                logits = logits / self.temperature.to(logits.device)
            out.append(torch.sigmoid(logits).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.label_names)), dtype=np.float32)


class _Fitted(torch.utils.data.Dataset):
    """Images ``read(i)`` fitted to the model's input size (uint8)."""

    def __init__(self, read, n: int, size: int, mode: str):
        self.read, self.n, self.size, self.mode = read, n, size, mode

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        from ..data.cache import fit_image

        return fit_image(self.read(i), self.size, self.mode)
