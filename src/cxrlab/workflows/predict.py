"""``cxrlab predict``: a CSV of probabilities and thresholded decisions for image files and folders.

An unreadable image does not cost the others their predictions: its row keeps the path, blank
probabilities and the reason in the ``error`` column (empty for every image that was read).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch


def predict_files(checkpoint: Path, inputs: list[Path], out_csv: Path, batch_size: int = 32,
                  workers: int | None = None):
    """Write a CSV: path, one probability column per label, ``<label>_positive`` at the
    checkpoint's thresholds (fitted on validation data when it was trained) and ``error``."""
    from ..checkpoint import find_checkpoint
    from ..data.sources.generic import collect_images
    from ..inference.predictions import write_predictions
    from ..inference.predictor import Predictor

    folder = find_checkpoint(checkpoint)
    if folder.resolve() != Path(checkpoint).resolve():
        print(f"predict: using checkpoint {folder}", file=sys.stderr)
    predictor = Predictor.from_checkpoint(folder)
    files = collect_images(inputs)
    probs, errors = _predict_tolerant(predictor, files, batch_size, workers)
    return write_predictions(out_csv, files, probs, errors, predictor.label_names, predictor.thresholds)


def _predict_tolerant(predictor, files: list[Path], batch_size: int, workers: int | None):
    """(N×L probabilities with NaN rows for unreadable images, per-image error text or "")."""
    from torch.utils.data import DataLoader

    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    dataset = _Tolerant(files, predictor.image_size, predictor.resize)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers if len(files) > batch_size else 0,
                        collate_fn=_collate)
    probs = np.full((len(files), len(predictor.label_names)), np.nan, dtype=np.float32)
    errors: list[str] = []
    start = 0
    for images, batch_errors in loader:
        ok = np.array([e == "" for e in batch_errors])
        if ok.any():
            probs[start + np.flatnonzero(ok)] = predictor.predict_cached(images[ok], batch_size=batch_size)
        errors += batch_errors
        start += len(batch_errors)
    return probs, errors


class _Tolerant(torch.utils.data.Dataset):
    """Image files fitted to the model's input size; a file that cannot be read gives a blank image and
    its error message instead of an exception that would lose the whole batch."""

    def __init__(self, files, size: int, mode: str):
        self.files, self.size, self.mode = list(files), size, mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from ..data.images import read_fitted

        try:  # the decoder prepare uses, so a file predicts from the pixels its training cache held
            return read_fitted(self.files[i], self.size, self.mode), ""
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this image's, reported in its row
            return np.zeros((self.size, self.size), np.uint8), f"{type(exc).__name__}: {exc}"


def _collate(items):
    return np.stack([image for image, _ in items]), [error for _, error in items]
