"""The ``cxrlab predict`` CSV, one format for the checkpoint and the ONNX paths (no torch here).

Columns: path, one probability per label, ``<label>_positive`` at the thresholds (blank for an
unreadable image) and ``error`` (empty for every image that was read). An unreadable image does not
cost the others their predictions.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np


def predictions_table(files, probs: np.ndarray, errors: list[str], label_names, thresholds):
    import pandas as pd

    names = list(label_names)
    read = np.array([e == "" for e in errors], dtype=bool)
    table = pd.DataFrame(probs, columns=names)
    positive = pd.DataFrame(probs >= np.asarray(thresholds), columns=[f"{n}_positive" for n in names]).astype("Int64")
    positive.loc[~read] = pd.NA  # no decision for an image that was not read
    return pd.concat([pd.DataFrame({"path": [str(f) for f in files]}), table, positive,
                      pd.DataFrame({"error": errors})], axis=1)


def write_predictions(out_csv, files, probs: np.ndarray, errors: list[str], label_names, thresholds):
    """Write the table under a temporary name and rename it into place (a crash mid-write leaves no
    half-written CSV under the real name); name each unreadable image on stderr. Returns the table."""
    table = predictions_table(files, probs, errors, label_names, thresholds)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_csv.with_name(f".{out_csv.name}.tmp-{os.getpid()}")
    try:
        table.to_csv(tmp, index=False, float_format="%.6f")
        os.replace(tmp, out_csv)
    finally:
        tmp.unlink(missing_ok=True)
    for path, error in zip(files, errors):
        if error:
            print(f"predict: cannot read {path}: {error}", file=sys.stderr)
    return table
