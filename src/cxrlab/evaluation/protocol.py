"""The protocol line at the top of every report and comparison: how a number was obtained (split,
level, input size, label policy, label count, the evaluated images, patients and studies), so a reader
sees at a glance whether two numbers can be compared."""
from __future__ import annotations

import pandas as pd

COUNTS = ("images", "patients", "studies")


def protocol(split: str, level: str, image_size: int, resize: str, policy: str, n_labels: int,
             evaluated: pd.DataFrame, run: str | None = None) -> dict:
    """metrics.json's ``protocol``: ``evaluated`` is the meta table (path, patient_id, study_id) of the
    scored images; ``run`` the fold (``r0f1``) of a cross-validation run."""
    out = {"split": split, "level": level, "image_size": int(image_size), "resize": resize, "policy": policy,
           "labels": int(n_labels), "images": int(len(evaluated)),
           "patients": int(evaluated["patient_id"].nunique()) if "patient_id" in evaluated else None,
           "studies": int(evaluated["study_id"].nunique()) if "study_id" in evaluated else None}
    if run is not None:
        out["run"] = run
    return out


def merge_protocols(protocols: list[dict]) -> dict | None:
    """One protocol for fold/seed runs: a setting shared by all runs as it is, counts as ``min–max``
    over the runs (each fold tests different images), settings that differ joined with `` / ``."""
    protocols = [p for p in protocols if p]
    if not protocols:
        return None
    out = {}
    for key in dict.fromkeys(k for p in protocols for k in p if k != "run"):
        values = [p.get(key) for p in protocols]
        if key in COUNTS and all(isinstance(v, int) for v in values):
            lo, hi = min(values), max(values)
            out[key] = lo if lo == hi else f"{lo}–{hi}"
        else:
            seen = list(dict.fromkeys(str(v) for v in values))
            out[key] = values[0] if len(seen) == 1 else " / ".join(seen)
    return out


def protocol_line(p: dict | None) -> str:
    """``**Protocol**: split official · level image + study (max ...) · 224 px (pad) · label policy u_ones ·
    5 labels · evaluated: 234 images, 200 patients, 200 studies``; empty without a protocol."""
    if not p:
        return ""
    run = f" (run {p['run']})" if p.get("run") else ""
    counts = ", ".join(f"{p[k]} {k}" for k in COUNTS if p.get(k) is not None)
    return (f"**Protocol**: split {p.get('split', '?')}{run} · level {p.get('level', '?')} · "
            f"{p.get('image_size', '?')} px ({p.get('resize', '?')}) · label policy {p.get('policy', '?')} · "
            f"{p.get('labels', '?')} labels · evaluated: {counts}")
