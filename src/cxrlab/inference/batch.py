"""The one tolerant batch predictor: images read (decoded and fitted) by a pool of threads one batch at a
time, so memory holds one batch of full-size images however many there are, and an unreadable image
costs only its own row. ``predict``, ``serve``, ``heatmap``, ``evaluate`` and ``calibrate`` all go
through it, with either backend."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import CxrlabError
from ..progress import Progress


class NonFiniteOutput(CxrlabError):
    """The model gave NaN or ±inf for an image it read: that row is an error, never a decision."""

    def __init__(self, row: np.ndarray, label_names, image: int):
        bad = [f"{name} = {value}" for name, value in zip(label_names, row) if not np.isfinite(value)]
        super().__init__(f"the model output a non-finite probability for image {image + 1} ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}); check the model's weights")


def error_text(exc: BaseException) -> str:
    """How an unreadable image is reported (the ``error`` column of ``cxrlab predict``)."""
    return f"{type(exc).__name__}: {exc}"


def tolerant_batches(predictor, n: int, read, batch_size: int = 32, workers: int | None = None):
    """Yield ``(start, fitted, probs, failures)`` per batch of ``read(start) .. read(start + k - 1)``:
    ``read(i)`` returns the uint8 input image or raises; ``fitted`` K×S×S (blank where it raised),
    ``probs`` K×L (NaN rows there), ``failures`` K exceptions or None. ``workers`` 0: read in this thread."""
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    size = predictor.image_size

    def attempt(i: int):
        try:
            return read(i), None
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this image's, reported in its row
            return np.zeros((size, size), np.uint8), exc

    pool = ThreadPoolExecutor(workers) if workers > 0 and n > 1 else None
    try:
        for start in range(0, n, batch_size):
            rows = range(start, min(n, start + batch_size))
            items = list(pool.map(attempt, rows) if pool else map(attempt, rows))
            fitted = np.stack([image for image, _ in items]) if items else np.zeros((0, size, size), np.uint8)
            failures = [exc for _, exc in items]
            ok = np.array([exc is None for exc in failures], dtype=bool)
            probs = np.full((len(items), len(predictor.label_names)), np.nan, dtype=np.float32)
            if ok.any():
                probs[ok] = predictor.predict_fitted(fitted[ok], batch_size)
            for k in np.flatnonzero(ok & ~np.isfinite(probs).all(axis=1)):  # a NaN is no decision, not a negative
                failures[k] = NonFiniteOutput(probs[k], predictor.label_names, start + k)
                probs[k] = np.nan
            yield start, fitted, probs, failures
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def predict_tolerant(predictor, n: int, read, batch_size: int = 32, workers: int | None = None, strict: bool = False,
                     progress: str | None = None) -> tuple[np.ndarray, list[BaseException | None]]:
    """(N×L probabilities with NaN rows for the images ``read`` could not give, their exceptions or
    None). ``strict``: raise the first failure instead (a labelled set must be read whole). ``progress``:
    the name a command's progress bar or lines go under (``cxrlab.progress``); None says nothing."""
    probs, failures = [], []
    with Progress(n, progress or "", enabled=progress is not None) as bar:
        for _, _, batch_probs, batch_failures in tolerant_batches(predictor, n, read, batch_size, workers):
            if strict:
                for exc in batch_failures:
                    if exc is not None:
                        raise exc
            probs.append(batch_probs)
            failures += batch_failures
            bar.update(len(batch_failures))
    if not probs:
        return np.zeros((0, len(predictor.label_names)), dtype=np.float32), []
    return np.concatenate(probs), failures
