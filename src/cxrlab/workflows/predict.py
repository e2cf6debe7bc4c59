"""``cxrlab predict``: a CSV of probabilities and thresholded decisions for image files and folders."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def predict_files(checkpoint: Path, inputs: list[Path], out_csv: Path, batch_size: int = 32) -> pd.DataFrame:
    """Write a CSV: path, one probability column per label, and ``<label>_positive`` at the
    checkpoint's thresholds (fitted on validation data when it was trained)."""
    from ..data.sources.generic import collect_images
    from ..inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(checkpoint)
    files = collect_images(inputs)
    probs = predictor.predict_files(files, batch_size=batch_size)
    table = pd.DataFrame(probs, columns=predictor.label_names)
    positive = pd.DataFrame((probs >= predictor.thresholds).astype(int),
                            columns=[f"{n}_positive" for n in predictor.label_names])
    table = pd.concat([pd.DataFrame({"path": [str(f) for f in files]}), table, positive], axis=1)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_csv, index=False, float_format="%.6f")
    return table
