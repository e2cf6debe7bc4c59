"""Strict JSON for reports, summaries and checkpoints: one sanitiser for the whole package."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np


def to_jsonable(obj):
    """A copy fit for strict JSON: NaN/inf → None; numpy, torch, tuples, Paths, dataclasses → plain Python."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if hasattr(obj, "detach"):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    return obj


def write_json(path: Path, obj, indent: int = 2) -> Path:
    """Strict JSON (NaN and inf written as null), so any JSON reader can load it."""
    path = Path(path)
    path.write_text(json.dumps(to_jsonable(obj), indent=indent, allow_nan=False) + "\n")
    return path


def sha256_file(path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks: how checkpoints, ensembles, exports and text
    encoders identify the bytes they depend on."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
