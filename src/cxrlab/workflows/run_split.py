"""Which images a run was trained, selected and tested on: ``split.json`` in the run folder.

``cv`` and ``compare`` read a finished run back (and resume an interrupted one) instead of training it
again; that is only right when the run saw the same split. The recipe alone does not say so: a 1×2 and
a 1×3 cross-validation of one recipe share the folder names ``r0f0`` and ``r0f1`` but not their folds.
So every run records a fingerprint of its train/val/test rows (the SHA-256 of the image paths of each
part, in order) with a short description, and a run is reused only when the fingerprint matches.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import CxrlabError
from ..serialization import write_json

SPLIT_FILE = "split.json"
PARTS = ("train", "val", "test")


def split_record(paths, parts: dict, manifest=None, fold: tuple[int, int] | None = None,
                 split: str = "") -> dict:
    """The record of one run's split: ``parts`` maps train/val/test to row positions into ``paths``
    (the prepared data's image paths); ``manifest``/``fold`` describe a cross-validation fold."""
    paths = np.asarray(paths, dtype=str)
    digest = hashlib.sha256()
    for name in PARTS:
        digest.update(f"[{name}]\n".encode())
        for path in paths[np.asarray(parts.get(name, []), dtype=np.int64)]:
            digest.update(path.encode("utf-8", "surrogateescape") + b"\n")
    if fold is not None and manifest is not None:
        what = f"{manifest['repeat'].nunique()}×{manifest['fold'].nunique()} CV, fold r{fold[0]}f{fold[1]}"
    else:
        what = f"{split or 'recipe'} split"
    return {"split": what, "sizes": {name: int(len(parts.get(name, []))) for name in PARTS},
            "sha256": digest.hexdigest()}


def describe(record: dict) -> str:
    sizes = record.get("sizes") or {}
    return f"{record.get('split', '?')}: " + "/".join(str(sizes.get(name, "?")) for name in PARTS) + \
        " train/val/test images"


def read_split(run_dir: Path) -> dict | None:
    """The recorded split of a run folder, or None when it has none (a run from before cxrlab recorded it)."""
    path = Path(run_dir) / SPLIT_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CxrlabError(f"{path} is corrupt ({exc}); remove {run_dir} to rerun it") from None
    if not isinstance(record, dict) or "sha256" not in record:
        raise CxrlabError(f"{path} is not a split record (no sha256); remove {run_dir} to rerun it")
    return record


def write_split(run_dir: Path, record: dict) -> Path:
    return write_json(Path(run_dir) / SPLIT_FILE, record)


def check_split(run_dir: Path, record: dict, required: bool = True) -> None:
    """Refuse to reuse ``run_dir`` unless it recorded the split ``record``; a run without a record is
    refused when ``required`` (it cannot be shown to match)."""
    saved = read_split(run_dir)
    if saved is None:
        if required:
            raise CxrlabError(f"{run_dir} records no split ({SPLIT_FILE}; made by an older cxrlab), so it cannot be "
                              "reused safely; choose another --out, or remove that folder to rerun it")
        return
    if saved.get("sha256") != record["sha256"]:
        now = describe(record)
        before = describe(saved)
        if before == now:
            now += " (the same sizes, other images)"
        raise CxrlabError(f"{run_dir} was trained on another split ({before}; now {now}); choose another --out, "
                          "or remove that folder to rerun it")
