"""A user's own data: a CSV of paths and label columns, or a folder of images without labels."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ...config import Duplicates, choose
from ...errors import CxrlabError, unknown
from ...labels import LabelSpace, parse_labels
from ..images import IMAGE_SUFFIXES
from ..records import Records
from ._common import (abspath, duplicate_rows, finish, first_line, label_matrix, looks_numeric, make_meta,
                      not_found, read_table, require_columns, space_for)

META_COLUMNS = ("path", "patient_id", "study_id", "view", "split", "sex", "age")
YES_NO = {"yes", "no", "y", "n", "true", "false", "positive", "negative"}
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validate": "val", "validation": "val",
               "test": "test"}


def load_csv(location, views=None, labels=None, duplicates: str = "warn") -> Records:
    """Rows of a CSV: the ``path`` column (required; relative paths are relative to the CSV's folder),
    label columns (``labels`` or every other mostly-numeric column), and optional ``patient_id`` (else
    the file stem: one patient per image), ``study_id``, ``view``, ``split``, ``sex``, ``age``.

    Labels are 1, 0, -1 or blank; a column of yes/no (true/false) words is an error naming it rather
    than a column silently left out. Exact duplicate rows are counted in a warning (``duplicates="drop"``
    keeps the first of each); one image listed twice with different patients or labels is an error
    naming both lines, since it could land on both sides of a patient-disjoint split.
    """
    csv = abspath(location)
    if not csv.is_file():
        raise not_found("csv", csv, "file")
    duplicates = choose(Duplicates, duplicates, "duplicates option")
    df = read_table(csv)
    if df.shape[1] == 0:
        raise CxrlabError(f"{csv}: no columns")
    require_columns(df, ["path"], csv)
    path_column = "path"
    columns = _label_columns(df, path_column, labels, csv)
    keep = duplicate_rows(df[["path", *(c for c in ("patient_id", *columns) if c in df.columns)]], csv, duplicates)
    try:
        values = label_matrix(df, columns, csv)
    except CxrlabError as exc:
        if labels is not None:
            raise
        raise CxrlabError(f"{exc} (numeric columns other than {', '.join(META_COLUMNS)} are read as labels; "
                          "name the label columns with labels=[...] to leave others out)") from None
    rel = df[path_column].astype("str").str.strip()
    if rel.isna().any() or (rel == "").any():
        raise CxrlabError(f"{csv}: line {first_line((rel.isna() | (rel == '')).to_numpy(bool))}: "
                          f"empty {path_column!r}")
    paths = (str(csv.parent) + os.sep + rel).where(~rel.str.startswith(os.sep), rel)
    stem = rel.str.replace(r"^.*[/\\]", "", regex=True).str.replace(r"\.[^.]*$", "", regex=True)
    meta = make_meta(paths, _column_or(df, "patient_id", stem), _column_or(df, "study_id", stem),
                     _column_or(df, "view", None), split=_split(df, csv), sex=df.get("sex"), age=df.get("age"))
    if not keep.all():
        meta, values = meta[keep].reset_index(drop=True), values[keep]
    space = labels if isinstance(labels, LabelSpace) else space_for(columns, csv.stem)
    return finish("csv", space, values, meta, views, csv)


def _label_columns(df: pd.DataFrame, path_column: str, labels, csv: Path) -> list[str]:
    if labels is not None:
        names = list(labels.names if isinstance(labels, LabelSpace) else parse_labels(labels).names)
        for name in names:
            if name not in df.columns:
                raise CxrlabError(f"{csv}: {unknown('label column', name, map(str, df.columns))}")
        return names
    skip = {path_column, *META_COLUMNS}
    for c in df.columns:
        if c not in skip and not looks_numeric(df[c]):
            words = set(df[c].dropna().astype("str").str.strip().str.lower()) - {""}
            if words and words <= YES_NO:
                raise CxrlabError(f"{csv}: column {c!r} holds yes/no words ({', '.join(sorted(words))}); write "
                                  "labels as 1 (positive), 0 (negative), -1 (uncertain) or blank (unknown)")
    return [c for c in df.columns if c not in skip and looks_numeric(df[c])]


def _column_or(df: pd.DataFrame, column: str, default) -> pd.Series | None:
    if column not in df.columns:
        return default
    return df[column].astype("str").str.strip()


def _split(df: pd.DataFrame, csv: Path) -> pd.Series | None:
    """A ``split`` column normalised to train/val/test (valid/validate/validation → val)."""
    if "split" not in df.columns:
        return None
    names = df["split"].astype("str").str.strip().str.lower()
    bad = ~names.isin(list(SPLIT_NAMES)).to_numpy(dtype=bool)
    if bad.any():
        line = first_line(bad)
        raise CxrlabError(f"{csv}: line {line}: split {df['split'].iloc[line - 2]!r} is not one of "
                          "train, val, test")
    return names.map(SPLIT_NAMES).astype("str")


def load_folder(location, views=None, labels=None) -> Records:
    """Every image under a folder (recursively), labels all unknown: for prediction only."""
    root = abspath(location)
    if not root.is_dir():
        raise CxrlabError(f"folder: not a folder: {root}")
    files = [str(p) for p in find_images(root)]
    if not files:
        raise CxrlabError(f"folder: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    space = labels if isinstance(labels, LabelSpace) else (
        parse_labels(labels) if labels is not None else LabelSpace("none", ()))
    stems = [Path(f).stem for f in files]
    values = np.full((len(files), len(space)), np.nan, dtype=np.float32)
    return finish("folder", space, values, make_meta(files, stems, stems, None), views, root)


def find_images(root: Path) -> list[Path]:
    """Every image file under ``root`` (recursively, by suffix), sorted: the one folder walker."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def collect_images(inputs) -> list[Path]:
    """Image files named directly or found under folders, in the order given (folders sorted)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += find_images(item)
        elif item.is_file():
            files.append(item)
        else:
            raise CxrlabError(f"input not found: {item}")
    if not files:
        raise CxrlabError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(map(str, inputs))}")
    return files
