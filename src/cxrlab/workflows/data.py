"""``cxrlab data stats``, ``cxrlab data split`` and ``cxrlab prepare``: look at a source, freeze its CV
folds, build its image cache. Each returns the text its command prints. Stats and split read label files
only, so they run in seconds on 200k rows.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..data.cache import MODES, ON_ERROR, prepare
from ..data.policies import POLICIES, PolicyResult, apply_policy
from ..data.records import Records
from ..data.sources import LABELLERS, parse_source
from ..data.splits import fold_balance, repeated_kfold, write_manifest
from ..data.statistics import data_stats, format_stats
from ..errors import unknown

__all__ = ["LABELLERS", "MODES", "ON_ERROR", "POLICIES", "prepare_source", "source_stats", "split_source"]


def source_stats(source: str, policy: str | None = None, views=None, labeller: str = "chexpert",
                 as_json: bool = False) -> str:
    """Images, patients, views and per-label counts of ``source`` (after ``policy``, if given): as
    plain-text tables, or one JSON object."""
    stats = data_stats(*_load(source, policy, views, labeller))
    return json.dumps(stats) if as_json else format_stats(stats, source)


def split_source(source: str, out: Path, folds: int = 5, repeats: int = 1, seed: int = 0,
                 policy: str | None = None, views=None, labeller: str = "chexpert") -> str:
    """Write a patient-disjoint, stratified ``repeats`` × ``folds`` manifest of ``source`` to ``out``;
    the text says how balanced each repeat came out. With a ``policy``, only the rows it keeps are
    split, stratified on its known positives."""
    records, result = _load(source, policy, views, labeller, seed=seed)
    if result is None:
        strata = records.values == 1
    else:
        records, strata = records.take(result.rows), (result.target * result.mask) > 0
    manifest = repeated_kfold(records, target=strata, folds=folds, repeats=repeats, seed=seed)
    write_manifest(manifest, out)
    sizes = manifest[manifest["repeat"] == 0].groupby("fold").size()
    lines = [f"wrote {out}: {repeats} × {folds} folds over {len(records):,} images of "
             f"{records.meta['patient_id'].nunique():,} patients (fold sizes in repeat 0: "
             f"{', '.join(str(int(s)) for s in sizes)})"]
    for repeat in range(repeats):
        fold = manifest["fold"].to_numpy()[manifest["repeat"].to_numpy() == repeat]
        b = fold_balance(fold, strata, label_names=records.labels.names)
        lines.append(f"repeat {repeat}: worst fold deviation of a label's image prevalence "
                     f"{100 * b['worst_prevalence_deviation']:.2f} % ({b['worst_label']}; {b['labels_checked']} "
                     f"labels with >= {b['min_positives']:,} positive images), of a fold's size "
                     f"{100 * b['worst_size_deviation']:.2f} %")
    return "\n".join(lines)


def prepare_source(source: str, out: Path, size: int, mode: str = "pad", workers: int | None = None,
                   on_error: str = "skip", views=None, progress: bool = True) -> str:
    """Decode ``source`` once into a ``size``×``size`` uint8 cache at ``out`` (see ``cxrlab.data.cache``)."""
    records = parse_source(source, views=views)
    info = prepare(records, out, size, mode=mode, workers=workers, on_error=on_error, progress=progress)
    state = "reused existing cache" if info.reused else "wrote"
    return (f"{state} {out}: {info.n} images of {info.size}×{info.size} ({info.mode}), {info.n_failed} failed, "
            f"labels {info.labels.name}")


def _load(source: str, policy: str | None, views, labeller: str,
          seed: int = 0) -> tuple[Records, PolicyResult | None]:
    """The (view-filtered) records of the source and, with a policy, the policy's result."""
    if policy and policy not in POLICIES:  # fail before a long load
        raise unknown("label policy", policy, POLICIES)
    records = parse_source(source, views=views, labeller=labeller)
    if not policy:
        return records, None
    return records, apply_policy(records.values, records.labels, policy, seed=seed)
