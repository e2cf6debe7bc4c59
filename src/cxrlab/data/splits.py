"""Patient-disjoint splits: the official ones, stratified random splits and repeated K-fold manifests.

Images of one patient are strongly correlated, so every split assigns whole patients. Stratification
is multi-label (iterative stratification, Sechidis et al. 2011, via the iterative-stratification
package) on each patient's labels aggregated with "any image positive".
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import CxrlabError
from .records import Records

PARTS = ("train", "val", "test")
MANIFEST_COLUMNS = ("path", "patient_id", "repeat", "fold")


def official_split(records: Records) -> dict[str, np.ndarray]:
    """Row positions of the source's own train/val/test parts (any may be empty, e.g. NIH has no val)."""
    if "split" not in records.meta.columns:
        raise CxrlabError(f"source {records.name!r} has no official split; use a random or k-fold split")
    split = records.meta["split"].to_numpy(dtype=object)
    return {part: np.flatnonzero(split == part) for part in PARTS}


def random_split(records_or_patients, target=None, val_fraction: float = 0.1, test_fraction: float = 0.2,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Row positions of train/val/test: patient-disjoint, multi-label stratified, reproducible.

    Pass ``Records`` (stratified on raw positives) or ``patient_ids`` (one per row) and a ``target``
    (N×L, positives > 0) to stratify on.
    """
    patients, target = _patients_and_target(records_or_patients, target)
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise CxrlabError(f"split fractions must be in [0, 1) with val + test < 1; got val={val_fraction}, "
                          f"test={test_fraction}")
    codes, patient_target = _per_patient(patients, target)
    ratios = np.array([1.0 - val_fraction - test_fraction, val_fraction, test_fraction])
    part_of_patient = _stratify(patient_target, ratios, np.random.RandomState(seed))
    part_of_row = part_of_patient[codes]
    return {part: np.flatnonzero(part_of_row == k) for k, part in enumerate(PARTS)}


def repeated_kfold(paths_or_records, patient_ids=None, target=None, folds: int = 5, repeats: int = 1,
                   seed: int = 0) -> pd.DataFrame:
    """A manifest DataFrame (path, patient_id, repeat, fold): ``repeats`` independent K-fold
    partitions of the patients (seed + repeat), each patient-disjoint and multi-label stratified."""
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
    codes, patient_target = _per_patient(patients, target)
    if len(patient_target) < folds:
        raise CxrlabError(f"{folds} folds need at least {folds} patients; the data has {len(patient_target)}")
    ratios = np.full(folds, 1.0 / folds)
    parts = []
    for repeat in range(repeats):
        fold_of_patient = _stratify(patient_target, ratios, np.random.RandomState(seed + repeat))
        parts.append(pd.DataFrame({"path": paths, "patient_id": patients, "repeat": repeat,
                                   "fold": fold_of_patient[codes]}))
    return pd.concat(parts, ignore_index=True)


def write_manifest(manifest: pd.DataFrame, path) -> Path:
    """Write a manifest CSV (columns path, patient_id, repeat, fold)."""
    _check_columns(manifest, path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest.loc[:, list(MANIFEST_COLUMNS)].to_csv(path, index=False)
    return path


def read_manifest(path, records: Records | None = None) -> pd.DataFrame:
    """Read a manifest and check it: no patient in two folds of one repeat, no image twice in a repeat,
    and (given ``records``) every path known with the same patient as in the records."""
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
                          f"source {records.name!r} ({int(unknown_path.sum())} unknown images)")
    wrong = (expected.astype(str) != manifest["patient_id"].astype(str)).to_numpy()
    if wrong.any():
        i = int(np.argmax(wrong))
        raise CxrlabError(f"split manifest {path}: image {manifest['path'].iloc[i]!r} has patient "
                          f"{manifest['patient_id'].iloc[i]!r} but the source says {expected.iloc[i]!r}")


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
    """(patient code of each row, P×L any-positive label matrix) over the sorted patient ids, so that
    the split depends on the set of patients and their labels, not on the row order."""
    uniques, codes = np.unique(patients.astype(str), return_inverse=True)
    per_patient = np.zeros((len(uniques), target.shape[1]), dtype=bool)
    rows, cols = np.nonzero(target)
    per_patient[codes[rows], cols] = True
    return codes, per_patient


def _stratify(target: np.ndarray, ratios: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Assign each row of a P×L bool matrix to a part with iterative stratification, after a seeded
    shuffle (the algorithm breaks ties with ``rng`` too, so the result depends only on the seed)."""
    from iterstrat.ml_stratifiers import IterativeStratification

    ratios = np.asarray(ratios, dtype=float)
    used = np.flatnonzero(ratios > 0)  # a part asked to be empty stays empty
    order = rng.permutation(len(target))
    shuffled = target[order].astype(bool)
    if shuffled.shape[1] < 2:  # the algorithm needs a label matrix; pad with an all-zero label
        shuffled = np.concatenate([shuffled, np.zeros((len(shuffled), 2 - shuffled.shape[1]), bool)], axis=1)
    if len(used) == 1:
        parts = np.zeros(len(target), dtype=np.int64)
    else:
        parts = IterativeStratification(labels=shuffled, r=ratios[used] / ratios[used].sum(), random_state=rng)
    out = np.empty(len(target), dtype=np.int64)
    out[order] = used[parts]
    return out
