"""Helpers every source shares: reading label tables, checking columns and values, view filters.

Sources read label files only (never images), vectorised with pandas, so a 200k-row file loads in
about a second. Row numbers in errors are file line numbers (the header is line 1).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ...config import Duplicates, choose
from ...errors import CxrlabError, closest, unknown
from ...labels import LABEL_SPACES, LabelSpace
from ..records import Records

ALLOWED_VALUES = (1.0, 0.0, -1.0)
VIEW_GROUPS = ("frontal", "lateral")


def abspath(path) -> Path:
    """Absolute and normalised, but symlinks kept (a dataset folder is often a link to storage)."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def not_found(kind: str, location, what: str = "folder") -> CxrlabError:
    """The data is not where the source says: name the path and the override that points elsewhere."""
    return CxrlabError(f"{kind}: {what} not found: {location}; point the source at your copy with "
                       f"data.source={kind}:<{what}> (a train/cv override) or --data {kind}:<{what}>")


def with_gz(names: Iterable[str]) -> list[str]:
    """Every name and its ``.gz`` variant, plain first."""
    return [n for name in names for n in (name, name + ".gz")]


def find_file(folder: Path, names: Sequence[str], what: str, required: bool = True) -> Path | None:
    """The first of ``names`` (or its .gz) inside ``folder``; a clear error listing them otherwise."""
    for name in with_gz(names):
        if (folder / name).is_file():
            return folder / name
    if required:
        raise CxrlabError(f"{what}: none of {', '.join(names)} (or .gz) found in {folder}")
    return None


def read_table(path: Path, usecols=None, dtype=None) -> pd.DataFrame:
    """A CSV (plain or gzip) as a DataFrame; unreadable or empty files are a CxrlabError."""
    try:
        return pd.read_csv(path, usecols=usecols, dtype=dtype, skipinitialspace=True)
    except FileNotFoundError:
        raise CxrlabError(f"label file not found: {path}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise CxrlabError(f"cannot read label file {path}: {exc}") from exc


def require_columns(df: pd.DataFrame, columns: Iterable[str], file) -> None:
    """Error naming the first missing column (and the closest column the file does have)."""
    for column in columns:
        if column not in df.columns:
            hint = closest(column, [str(c) for c in df.columns])
            extra = f"; did you mean {hint!r}?" if hint else ""
            raise CxrlabError(f"{file}: required column {column!r} is missing{extra} "
                              f"(columns: {', '.join(map(str, df.columns))})")


def label_matrix(df: pd.DataFrame, columns: Sequence[str], file) -> np.ndarray:
    """The N×L float32 raw label matrix; only 1, 0, -1 and blank (→ NaN) are accepted.

    ``df`` must still be in file order, so that position ``i`` is line ``i + 2`` of ``file``.
    """
    out = np.empty((len(df), len(columns)), dtype=np.float32)
    for j, column in enumerate(columns):
        raw = df[column]
        numbers, unparsable = _as_numbers(raw)
        bad = unparsable | ~(np.isnan(numbers) | np.isin(numbers, ALLOWED_VALUES))
        if bad.any():
            i = int(np.argmax(bad))
            raise CxrlabError(f"{file}: row {i + 1} (line {i + 2}), column {column!r}: label value "
                              f"{_plain(raw.iloc[i])!r} is not one of 1, 0, -1 or blank")
        out[:, j] = numbers
    return out


def _plain(value):
    """numpy scalars as plain Python values, so messages read 2.0 rather than np.float64(2.0)."""
    return value.item() if isinstance(value, np.generic) else value


def _as_numbers(raw: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(float values with NaN for blanks, mask of non-blank cells that are not numbers)."""
    if pd.api.types.is_numeric_dtype(raw) or pd.api.types.is_bool_dtype(raw):
        numbers = raw.to_numpy(dtype=np.float64, na_value=np.nan)
        return numbers, np.zeros(len(raw), dtype=bool)
    text = raw.astype("str").str.strip()
    blank = (text.isna() | (text == "")).to_numpy(dtype=bool)
    numbers = pd.to_numeric(text.mask(blank), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return numbers, ~blank & np.isnan(numbers)


def looks_numeric(raw: pd.Series) -> bool:
    """A column is a label column when most of its non-blank cells are numbers (a stray "yes" in it
    is then reported as a bad label value instead of silently dropping the column)."""
    numbers, unparsable = _as_numbers(raw)
    parsed = int((~np.isnan(numbers)).sum())
    return parsed > 0 and parsed >= int(unparsable.sum())


def space_for(names: Sequence[str], default_name: str) -> LabelSpace:
    """A registered label space when the names are exactly one (same order), else a custom one."""
    names = tuple(names)
    for space in LABEL_SPACES.values():
        if space.names == names:
            return space
    return LabelSpace(default_name, names)


def view_group(view: pd.Series) -> np.ndarray:
    """frontal (AP/PA and their variants: AP AXIAL, PA LLD, ...), lateral (LATERAL, LL, RL),
    unknown (blank) or other, from a view-position column."""
    v = view.astype("str").fillna("").str.strip().str.upper()
    frontal = (v.str.match(r"^(AP|PA)\b") | (v == "FRONTAL")).to_numpy(dtype=bool)
    lateral = (v.str.contains("LAT") | v.isin(["LL", "RL"])).to_numpy(dtype=bool)
    blank = v.isin(["", "UNKNOWN"]).to_numpy(dtype=bool)
    return np.where(frontal, "frontal", np.where(lateral, "lateral", np.where(blank, "unknown", "other")))


def make_meta(path, patient_id, study_id, view, frontal_lateral=None, split=None, sex=None,
              age=None) -> pd.DataFrame:
    """The meta table every source returns (``split`` only where the dataset has an official one;
    ``sex`` and ``age`` only where the label file gives them, for subgroup evaluation)."""
    if view is None:
        view = ["unknown"] * len(path)
    view = pd.Series(view, dtype="str").fillna("unknown").replace("", "unknown")
    columns = {
        "path": pd.Series(path, dtype="str"),
        "patient_id": pd.Series(patient_id, dtype="str"),
        "study_id": pd.Series(study_id, dtype="str"),
        "view": view,
        "frontal_lateral": pd.Series(view_group(view) if frontal_lateral is None else frontal_lateral,
                                     dtype="str"),
    }
    if split is not None:
        columns["split"] = pd.Series(split, dtype="str")
    if sex is not None:
        columns["sex"] = pd.Series(normal_sex(pd.Series(sex)), dtype="str")
    if age is not None:
        columns["age"] = pd.Series(normal_age(pd.Series(age)), dtype="float64")
    return pd.DataFrame({k: v.reset_index(drop=True) for k, v in columns.items()})


def normal_sex(sex: pd.Series) -> np.ndarray:
    """female / male / unknown from M/F (NIH) or Male/Female/Unknown (CheXpert)."""
    v = sex.astype("str").fillna("").str.strip().str.lower().str[:1]
    return np.where(v == "f", "female", np.where(v == "m", "male", "unknown"))


def normal_age(age: pd.Series) -> np.ndarray:
    """Age in years; blank, non-numbers and impossible values (NIH lists a few ages of 148-414) → NaN."""
    years = pd.to_numeric(age, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return np.where((years >= 0) & (years <= 120), years, np.nan)


def finish(name: str, labels: LabelSpace, values: np.ndarray, meta: pd.DataFrame, views, where) -> Records:
    """Records, view-filtered, with an error rather than an empty dataset."""
    if len(meta) == 0:
        raise CxrlabError(f"{name}: no images listed in {where}")
    return filter_views(Records(name, labels, np.ascontiguousarray(values, dtype=np.float32), meta), views)


def parse_views(views) -> list[str]:
    """None → [] (keep all); "frontal" or "PA,AP" or ["PA", "AP"] → a list of names."""
    if views is None:
        return []
    items = views.split(",") if isinstance(views, str) else list(views)
    return [str(item).strip() for item in items if str(item).strip()]


def filter_views(records: Records, views) -> Records:
    """Keep rows whose view group (frontal/lateral) or view position (PA, AP, LL, ...) was asked for.

    Every view is kept when ``views`` is None. A name that matches no view of the dataset is an error
    with the closest name; an empty result is an error listing the views present.
    """
    wanted = parse_views(views)
    if not wanted:
        return records
    meta = records.meta
    if "view" not in meta.columns:
        raise CxrlabError(f"{records.name}: views {wanted} asked for, but the source has no view column")
    groups = meta["frontal_lateral"] if "frontal_lateral" in meta.columns else pd.Series(view_group(meta["view"]))
    group = groups.astype("str").fillna("unknown").str.lower().to_numpy(dtype=object)
    position = meta["view"].astype("str").fillna("unknown").str.upper().to_numpy(dtype=object)
    present = sorted(set(meta["view"].astype("str").fillna("unknown")))
    keep = np.zeros(len(meta), dtype=bool)
    for item in wanted:
        if item.lower() in VIEW_GROUPS:
            keep |= group == item.lower()
        elif item.upper() in {p.upper() for p in present}:
            keep |= position == item.upper()
        else:
            raise unknown(f"view in {records.name}:", item, list(VIEW_GROUPS) + present)
    if not keep.any():
        counts = meta["view"].value_counts().to_dict()
        raise CxrlabError(f"{records.name}: no images left after keeping views {wanted} "
                          f"(views present: {counts})")
    return records.take(np.flatnonzero(keep))


def first_line(mask) -> int:
    """File line of the first True in a row mask (header is line 1)."""
    return int(np.argmax(np.asarray(mask, dtype=bool))) + 2


def duplicate_rows(key: pd.DataFrame, where, duplicates: str = "warn", image: str = "path") -> np.ndarray:
    """The rows of a label file to keep. ``key`` holds, in file order (position ``i`` = line ``i + 2``),
    the ``image`` column and the columns that must agree for one image (patient, labels). Rows repeating
    an image with the same values: a warning with their count and lines (dropped with
    ``duplicates="drop"``); the same image with different values: an error naming the first two such lines
    and the columns that differ, since the image could land on both sides of a patient-disjoint split."""
    duplicates = choose(Duplicates, duplicates, "duplicates option")
    key = key.reset_index(drop=True).astype("str").apply(lambda col: col.str.strip())
    exact = key.duplicated(keep="first").to_numpy(bool)
    if exact.any():
        lines = ", ".join(str(i + 2) for i in np.flatnonzero(exact)[:5])
        action = "dropped" if duplicates is Duplicates.DROP else "kept (data.duplicates=drop drops them)"
        logging.getLogger("cxrlab").warning(f"warning: {where}: {int(exact.sum())} duplicate rows (lines "
                                            f"{lines}{', ...' if exact.sum() > 5 else ''}) {action}")
    distinct = key[~exact]
    clash = distinct[image].duplicated(keep=False).to_numpy(bool)
    if clash.any():
        first = distinct[clash].iloc[0][image]
        rows = np.flatnonzero(distinct[image].to_numpy() == first)
        a, b = distinct.index[rows[0]], distinct.index[rows[1]]
        differ = [c for c in key.columns if c != image and key.at[a, c] != key.at[b, c]]
        raise CxrlabError(f"{where}: lines {a + 2} and {b + 2} list the same image {first!r} with different "
                          f"{', '.join(repr(c) for c in differ)}; one image must have one patient and one "
                          "set of labels")
    return ~exact if duplicates is Duplicates.DROP else np.ones(len(key), dtype=bool)
