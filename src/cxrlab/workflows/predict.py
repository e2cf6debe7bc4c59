"""``cxrlab predict``: a CSV (or JSON, DICOM SRs, a FHIR Bundle) of probabilities and thresholded decisions
for image files and folders, from a checkpoint (PyTorch) or an ONNX export (ONNX Runtime only: torch is
not imported on that path).

An unreadable image does not cost the others their predictions: its row keeps the path, blank
probabilities and the reason in the ``error`` column (empty for every image that was read).
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..data.sources.generic import collect_images
from ..inference.batch import error_text, predict_tolerant
from ..inference.interop import outputs
from ..inference.predictor import Predictor


def predict_files(model: Path, inputs: list[Path], out_csv: Path, batch_size: int = 32,
                  workers: int | None = None, overwrite: bool = True, progress: bool = True, format: str = "csv",
                  generate_uids: bool = False):
    """Write a CSV: path, one probability column per label, ``<label>_positive`` at the model card's
    thresholds (fitted on validation data when it was trained, or by ``calibrate``) and ``error``.
    ``model``: a checkpoint or run folder, or a ``model.onnx``; an existing ``out_csv`` is refused unless
    ``overwrite``; ``progress``: a bar, or lines outside a terminal, while it works. Returns the table.
    ``format`` json, dicom-sr (``out_csv`` is then a folder: one SR per DICOM image; a PNG/JPEG is refused
    unless ``generate_uids``) or fhir (an R4B Bundle) writes that instead (``inference.interop.outputs``)."""
    outputs.check_out(format, out_csv, overwrite)
    if Path(model).suffix.lower() != ".onnx":
        from ..checkpoint import find_checkpoint  # lazy: imports torch, which the ONNX path must not

        folder = find_checkpoint(model)
        if folder.resolve() != Path(model).resolve():
            print(f"predict: using checkpoint {folder}", file=sys.stderr)
        model = folder
    files = collect_images(inputs)
    headers = outputs.sources(format, files, generate_uids)  # before any work: a PNG for an SR is refused now
    predictor = Predictor.load(model)
    probs, failures = predict_tolerant(predictor, len(files), lambda i: predictor.fit(files[i]), batch_size, workers,
                                       progress="predict" if progress else None)
    errors = ["" if exc is None else error_text(exc) for exc in failures]
    return outputs.write(format, out_csv, files, probs, errors, predictor, headers)
