"""Where a served model came from, in one record for ``/version`` and the web page: the training data
(source, and whether it was synthetic or real), the recipe, the date and the model's hash.

A model trained on the embedded synthetic radiographs answers like any other; this record (and the
page's warning built from it) is what tells a reader its outputs say nothing about real X-rays.
"""
from __future__ import annotations

import time
from pathlib import Path

# source kinds (cxrlab.data.sources.KINDS) as a reader knows the data sets
DATASETS = {"nih": "NIH ChestX-ray14", "chexpert": "CheXpert", "mimic": "MIMIC-CXR-JPG", "csv": "CSV label file",
            "folder": "image folder", "synthetic": "synthetic radiographs"}


def data_kind(source: str) -> str:
    """'synthetic', 'real' or 'unknown' (a card without a source, e.g. an old version-1 export)."""
    kind = source.split(":", 1)[0].strip().lower() if ":" in source else ""
    if kind == "synthetic":
        return "synthetic"
    return "real" if kind in DATASETS else "unknown"


def provenance(card, identity: dict, model_path) -> dict:
    """The record: ``source``, ``data_kind``, ``dataset``, ``recipe``, ``date`` (and ``date_from``: the card,
    or the model file's modification time for a card from before dates were recorded), ``model_sha256``
    and ``summary``, one line a person reads."""
    training = card.training
    source = training.source or ""
    kind = data_kind(source)
    date, date_from = getattr(training, "date", "") or "", "card"
    if not date:
        path = Path(model_path)
        file = path if path.is_file() else next((p for p in (path / "checkpoint.json", path / "best" / "checkpoint.json")
                                                 if p.is_file()), None)
        date, date_from = (time.strftime("%Y-%m-%d", time.gmtime(file.stat().st_mtime)), "file") if file else ("", "")
    # the served file's hash for an export; the weights' for a checkpoint (its JSON changes with calibrate)
    sha = (identity.get("sha256") if identity.get("format") == "onnx" else identity.get("weights_sha256")
           or identity.get("sha256")) or ""
    dataset = DATASETS.get(source.split(":", 1)[0].strip().lower(), "unknown data")
    parts = [f"trained on {dataset} ({source})" if source else "training data not recorded",
             f"recipe {training.recipe}" if training.recipe else "recipe not recorded",
             (f"written {date}" if date_from == "card" else f"file dated {date}") if date else "date unknown",
             f"model {sha[:12]}" if sha else "no hash"]
    return {"source": source, "data_kind": kind, "dataset": dataset, "recipe": training.recipe, "date": date,
            "date_from": date_from, "model_sha256": sha, "summary": " · ".join(parts)}
