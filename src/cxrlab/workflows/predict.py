"""``cxrlab predict``: a CSV of probabilities and thresholded decisions for image files and folders, from
a checkpoint (PyTorch) or an ONNX export (ONNX Runtime only: torch is not imported on that path).

An unreadable image does not cost the others their predictions: its row keeps the path, blank
probabilities and the reason in the ``error`` column (empty for every image that was read).
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..data.sources.generic import collect_images
from ..inference.batch import error_text, predict_tolerant
from ..inference.predictions import write_predictions
from ..inference.predictor import Predictor
from ..paths import check_output_file


def predict_files(model: Path, inputs: list[Path], out_csv: Path, batch_size: int = 32,
                  workers: int | None = None, overwrite: bool = True, progress: bool = True):
    """Write a CSV: path, one probability column per label, ``<label>_positive`` at the model card's
    thresholds (fitted on validation data when it was trained, or by ``calibrate``) and ``error``.
    ``model``: a checkpoint or run folder, or a ``model.onnx``; an existing ``out_csv`` is refused unless
    ``overwrite``; ``progress``: a bar, or lines outside a terminal, while it works. Returns the table."""
    check_output_file(out_csv, overwrite=overwrite, what="predictions file")
    if Path(model).suffix.lower() != ".onnx":
        from ..checkpoint import find_checkpoint  # lazy: imports torch, which the ONNX path must not

        folder = find_checkpoint(model)
        if folder.resolve() != Path(model).resolve():
            print(f"predict: using checkpoint {folder}", file=sys.stderr)
        model = folder
    predictor = Predictor.load(model)
    files = collect_images(inputs)
    probs, failures = predict_tolerant(predictor, len(files), lambda i: predictor.fit(files[i]), batch_size, workers,
                                       progress="predict" if progress else None)
    errors = ["" if exc is None else error_text(exc) for exc in failures]
    return write_predictions(out_csv, files, probs, errors, predictor.label_names, predictor.thresholds)
