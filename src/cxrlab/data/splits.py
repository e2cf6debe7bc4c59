"""Patient-disjoint splits: stratified train/val/test (``random_split``), repeated K-fold manifests
(``repeated_kfold``, written and checked by ``write_manifest``/``read_manifest``) and how balanced a split
came out (``fold_balance``). Official splits are not made here: a source marks them in its ``split``
column and ``data/prepared.py`` uses it.

Images of one patient are strongly correlated, so every split assigns whole patients. Patients carry
from one to hundreds of images, so stratifying patients on "any image positive" (as iterative
stratification does, Sechidis et al., ECML PKDD 2011) leaves the per-label *image* prevalence of a fold
off by 10-20 %. Instead patients are placed greedily, largest and rarest first, each into the part
whose per-label positive-image counts and image count fall furthest behind their share: the
group-aware variant of Sechidis et al.'s idea, with the balance criterion of scikit-learn's
``StratifiedGroupKFold`` (the spread of each count's fill fraction over the parts) applied to image
counts. A seeded shuffle before the stable ordering and random tie-breaks make repeats differ.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import CxrlabError
from .records import Records

PARTS = ("train", "val", "test")
MANIFEST_COLUMNS = ("path", "patient_id", "repeat", "fold")


def random_split(records_or_patients, target=None, val_fraction: float = 0.1, test_fraction: float = 0.2,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Row positions of train/val/test: patient-disjoint, reproducible, and balanced so each part holds
    its fraction of the images and of every label's positive images.

    Pass ``Records`` (stratified on raw positives) or ``patient_ids`` (one per row) and a ``target``
    (N×L, positives > 0) to stratify on.
    """
    patients, target = _patients_and_target(records_or_patients, target)
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise CxrlabError(f"split fractions must be in [0, 1) with val + test < 1; got val={val_fraction}, "
                          f"test={test_fraction}")
    codes, patient_counts = _per_patient(patients, target)
    ratios = np.array([1.0 - val_fraction - test_fraction, val_fraction, test_fraction])
    part_of_patient = _stratify(patient_counts, ratios, np.random.RandomState(seed))
    part_of_row = part_of_patient[codes]
    return {part: np.flatnonzero(part_of_row == k) for k, part in enumerate(PARTS)}


def repeated_kfold(paths_or_records, patient_ids=None, target=None, folds: int = 5, repeats: int = 1,
                   seed: int = 0) -> pd.DataFrame:
    """A manifest DataFrame (path, patient_id, repeat, fold): ``repeats`` independent K-fold
    partitions of the patients (seed + repeat), each patient-disjoint, with equal image counts and
    equal per-label positive-image counts per fold (``fold_balance`` says how close they came)."""
    if isinstance(paths_or_records, Records):
        records = paths_or_records
        paths = records.meta["path"].to_numpy(dtype=object)
        patient_ids = records.meta["patient_id"].to_numpy(dtype=object) if patient_ids is None else patient_ids
        target = (records.values == 1) if target is None else target
    else:
        paths = np.asarray(paths_or_records, dtype=object)
    if patient_ids is None or target is None:
        raise CxrlabError("repeated_kfold needs Records, or paths with patient_ids and a target")
    patients, target = _patients_and_target(np.asarray(patient_ids, dtype=object), target)
    if len(paths) != len(patients):
        raise CxrlabError(f"repeated_kfold: {len(paths)} paths but {len(patients)} patient ids")
    if folds < 2 or repeats < 1:
        raise CxrlabError(f"need folds >= 2 and repeats >= 1; got folds={folds}, repeats={repeats}")
    codes, patient_counts = _per_patient(patients, target)
    if len(patient_counts) < folds:
        raise CxrlabError(f"{folds} folds need at least {folds} patients; the data has {len(patient_counts)}")
    ratios = np.full(folds, 1.0 / folds)
    parts = []
    for repeat in range(repeats):
        fold_of_patient = _stratify(patient_counts, ratios, np.random.RandomState(seed + repeat))
        parts.append(pd.DataFrame({"path": paths, "patient_id": patients, "repeat": repeat,
                                   "fold": fold_of_patient[codes]}))
    return pd.concat(parts, ignore_index=True)


def write_manifest(manifest: pd.DataFrame, path) -> Path:
    """Write a manifest CSV (columns path, patient_id, repeat, fold) with image paths relative to the
    folder that holds them all (the source root), so the file moves with the data and between machines;
    locators that are not absolute file paths (``synthetic://``) are written as they are."""
    _check_columns(manifest, path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = manifest.loc[:, list(MANIFEST_COLUMNS)].copy()
    out["path"] = relative_paths(out["path"].astype(str))
    out.to_csv(path, index=False)
    return path


def relative_paths(paths: pd.Series) -> pd.Series:
    """Absolute paths relative to the deepest folder they share; anything else unchanged."""
    if len(paths) == 0 or not paths.map(os.path.isabs).all():
        return paths
    root = os.path.commonpath(sorted({os.path.dirname(p) for p in paths.unique()}))
    return paths.str.slice(len(root.rstrip(os.sep)) + 1)


def resolve_paths(manifest: pd.DataFrame, source_paths, where) -> pd.DataFrame:
    """``manifest`` with relative paths made absolute against where the source's images lie now: the root
    is what precedes a listed relative path in the first source path that ends in one. A manifest with
    absolute paths (written before paths were relative) comes back unchanged."""
    listed = manifest["path"].astype(str)
    relative = ~listed.map(os.path.isabs) & ~listed.str.contains("://", regex=False)
    if not relative.any():
        return manifest
    wanted = set(listed[relative])
    for source_path in map(str, source_paths):
        parts = source_path.split(os.sep)
        for k in range(1, len(parts)):
            if os.sep.join(parts[k:]) in wanted:
                out = manifest.copy()
                out.loc[relative, "path"] = os.sep.join(parts[:k]) + os.sep + listed[relative]
                return out
    example = next(iter(map(str, source_paths)), "none")
    raise CxrlabError(f"split manifest {where}: no image of the source ends in a path the manifest lists "
                      f"(manifest {listed[relative].iloc[0]!r}, source {example!r}); was it written for another "
                      "source?")


def read_manifest(path, records: Records | None = None) -> pd.DataFrame:
    """Read a manifest and check it: no patient in two folds of one repeat, no image twice in a repeat,
    and (given ``records``) every path known with the same patient as in the records. Relative paths
    are resolved against the records' image paths (``resolve_paths``)."""
    try:
        manifest = pd.read_csv(path, dtype={"path": "str", "patient_id": "str"})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CxrlabError(f"cannot read split manifest {path}: {exc}") from exc
    _check_columns(manifest, path)
    for column in ("repeat", "fold"):
        if not pd.api.types.is_integer_dtype(manifest[column]):
            raise CxrlabError(f"split manifest {path}: column {column!r} must hold integers")
    _check_leakage(manifest, path)
    if records is not None:
        manifest = resolve_paths(manifest, records.meta["path"].to_numpy(), path)
        _check_known(manifest, records, path)
    return manifest


def _check_columns(manifest: pd.DataFrame, path) -> None:
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise CxrlabError(f"split manifest {path}: missing column(s) {missing} (needs {list(MANIFEST_COLUMNS)})")


def _check_leakage(manifest: pd.DataFrame, path) -> None:
    folds = manifest.groupby(["repeat", "patient_id"])["fold"].nunique()
    leaking = folds[folds > 1]
    if len(leaking):
        repeat, patient = leaking.index[0]
        seen = sorted(manifest.loc[(manifest["repeat"] == repeat) & (manifest["patient_id"] == patient), "fold"]
                      .unique().tolist())
        raise CxrlabError(f"split manifest {path}: patient {patient!r} is in folds {seen} of repeat {repeat} "
                          "(patient leakage)")
    twice = manifest.duplicated(["repeat", "path"])
    if twice.any():
        row = manifest[twice].iloc[0]
        raise CxrlabError(f"split manifest {path}: image {row['path']!r} is listed twice in repeat {row['repeat']}")


def _check_known(manifest: pd.DataFrame, records: Records, path) -> None:
    owner = pd.Series(records.meta["patient_id"].to_numpy(dtype=object),
                      index=records.meta["path"].to_numpy(dtype=object))
    owner = owner[~owner.index.duplicated()]
    expected = manifest["path"].map(owner)
    unknown_path = expected.isna().to_numpy()
    if unknown_path.any():
        raise CxrlabError(f"split manifest {path}: image {manifest['path'][unknown_path].iloc[0]!r} is not in "
                          f"source {records.name!r} ({int(unknown_path.sum())} unknown images: "
                          f"{_some(manifest['path'][unknown_path])})")
    wrong = (expected.astype(str) != manifest["patient_id"].astype(str)).to_numpy()
    if wrong.any():
        i = int(np.argmax(wrong))
        raise CxrlabError(f"split manifest {path}: image {manifest['path'].iloc[i]!r} has patient "
                          f"{manifest['patient_id'].iloc[i]!r} but the source says {expected.iloc[i]!r}")


def _some(values, n: int = 3) -> str:
    """The first ``n`` of a list of names, and how many more."""
    values = [str(v) for v in values]
    return ", ".join(values[:n]) + (f" and {len(values) - n} more" if len(values) > n else "")


def _patients_and_target(records_or_patients, target):
    """(patient id per row, N×L bool positives) from Records or from explicit arrays."""
    if isinstance(records_or_patients, Records):
        patients = records_or_patients.meta["patient_id"].to_numpy(dtype=object)
        target = (records_or_patients.values == 1) if target is None else target
    else:
        patients = np.asarray(records_or_patients, dtype=object)
    if target is None:
        raise CxrlabError("a split needs labels to stratify on (target), or Records")
    target = np.nan_to_num(np.asarray(target, dtype=np.float32), nan=0.0)
    if target.ndim == 1:
        target = target[:, None]
    if len(target) != len(patients):
        raise CxrlabError(f"{len(patients)} patient ids but {len(target)} label rows")
    if len(patients) == 0:
        raise CxrlabError("cannot split an empty dataset")
    if pd.isna(patients).any():
        raise CxrlabError(f"row {int(np.argmax(pd.isna(patients)))}: missing patient id")
    return patients, target > 0


def _per_patient(patients: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(patient code of each row, P×(1+L) counts: images, then positive images per label) over the
    sorted patient ids, so that the split depends on the set of patients and their labels, not on the
    row order."""
    uniques, codes = np.unique(patients.astype(str), return_inverse=True)
    counts = np.zeros((len(uniques), 1 + target.shape[1]), dtype=np.int64)
    np.add.at(counts[:, 0], codes, 1)
    rows, cols = np.nonzero(target)
    np.add.at(counts, (codes[rows], 1 + cols), 1)
    return codes, counts


def _stratify(counts: np.ndarray, ratios: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Part of each patient (row of the P×F ``counts``): greedy, largest and rarest patients first.

    Each count column j of part k is tracked as a fill fraction x_kj = count_kj / (ratio_k · total_j);
    a perfect split has every x_kj equal. A patient goes to the part where adding it increases
    Σ_j Σ_k (x_kj − mean_k x_kj)² least. Adding d to x_kj changes that sum by 2·d·(x_kj − mean_j) +
    d²·(1 − 1/K), so a candidate costs a few operations on the patient's nonzero columns only.
    """
    ratios = np.asarray(ratios, dtype=float)
    used = np.flatnonzero(ratios > 0)  # a part asked to be empty stays empty
    out = np.full(len(counts), used[0], dtype=np.int64)
    if len(used) == 1:
        return out
    share = ratios[used] / ratios[used].sum()
    totals = counts.sum(0).astype(np.float64)
    present = totals > 0
    counts, totals = counts[:, present], totals[present]
    n_parts = len(used)
    # images weigh as much as all labels together, so part sizes stay as tight as the prevalences
    weight = np.ones(counts.shape[1])
    weight[0] = max(1, counts.shape[1] - 1)
    # order: the rarest label a patient carries first (its total image count), then more images first;
    # a seeded shuffle beforehand orders the many ties differently in every repeat
    rarity = np.where(counts[:, 1:] > 0, totals[None, 1:], np.inf).min(1, initial=np.inf)
    shuffled = rng.permutation(len(counts))
    order = shuffled[np.lexsort((-counts[shuffled, 0], rarity[shuffled]))]
    fill = np.zeros((n_parts, counts.shape[1]))
    fill_sum = np.zeros(counts.shape[1])
    scale = 1.0 / (share[:, None] * totals[None, :])
    shrink = 1.0 - 1.0 / n_parts
    nonzero = [np.flatnonzero(row) for row in counts[order] > 0]
    tie_orders = rng.random_sample((len(order), n_parts)).argsort(1)  # equal costs: a random part
    for p, cols, parts in zip(order, nonzero, tie_orders):
        step = counts[p, cols] * scale[:, cols]  # K × nnz fill increments
        centred = fill[:, cols] - fill_sum[cols] / n_parts
        cost = (weight[cols] * step * (2.0 * centred + shrink * step)).sum(1)
        k = int(parts[np.argmin(cost[parts])])
        fill[k, cols] += step[k]
        fill_sum[cols] += step[k]
        out[p] = used[k]
    return out


def fold_balance(part_of_row: np.ndarray, target, ratios=None, min_positives: int = 1000,
                 label_names=None) -> dict:
    """How well a split matches the data: the worst relative deviation of a part's per-label image
    prevalence from the overall prevalence, over labels with at least ``min_positives`` positive images
    (all labels with a positive where none has that many), and the worst relative deviation of a part's
    size from its share (``ratios``; equal shares by default)."""
    part = np.asarray(part_of_row)
    positives = np.nan_to_num(np.asarray(target, dtype=np.float64), nan=0.0) > 0
    if positives.ndim == 1:
        positives = positives[:, None]
    n_parts = int(part.max()) + 1
    ratios = np.full(n_parts, 1.0 / n_parts) if ratios is None else np.asarray(ratios, dtype=float)
    per_label = positives.sum(0)
    threshold = min_positives if (per_label >= min_positives).any() else 1
    checked = np.flatnonzero(per_label >= threshold)
    overall = positives[:, checked].mean(0)
    sizes = np.bincount(part, minlength=len(ratios))
    worst, worst_label = 0.0, None
    for k in np.flatnonzero(ratios > 0):
        if sizes[k] == 0 or len(checked) == 0:
            continue
        deviation = np.abs(positives[part == k][:, checked].mean(0) - overall) / overall
        if deviation.max() > worst:
            worst, worst_label = float(deviation.max()), int(checked[np.argmax(deviation)])
    expected = ratios * len(part)
    size_dev = np.abs(sizes - expected)[ratios > 0] / expected[ratios > 0]
    name = (None if worst_label is None else
            (str(label_names[worst_label]) if label_names is not None else f"label column {worst_label}"))
    return {"worst_prevalence_deviation": worst, "worst_label": name, "labels_checked": int(len(checked)),
            "min_positives": int(threshold), "worst_size_deviation": float(size_dev.max())}
