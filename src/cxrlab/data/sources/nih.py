"""NIH ChestX-ray14 (Wang et al., CVPR 2017): ``Data_Entry_2017*.csv`` plus the images.

Images may lie flat in ``images/`` or the root, or in the distributed ``images_001/images/`` ...
folders; one directory scan maps file names to paths, so an image missing on disk is only an error
when it is read (naming it), never while loading labels.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import CxrlabError, unknown
from ...labels import NIH14, NO_FINDING
from ..images import IMAGE_SUFFIXES
from ..records import Records
from ._common import (abspath, duplicate_rows, find_file, finish, first_line, make_meta, not_found, read_table,
                      require_columns)

LABEL_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")
DEMOGRAPHICS = ("Patient Age", "Patient Gender")  # optional: subgroup evaluation only
SPLIT_FILES = {"train": "train_val_list.txt", "test": "test_list.txt"}


def load_nih(location, views=None, duplicates: str = "warn") -> Records:
    """Records over NIH14 (all labels known: absent = 0); ``split`` = train/test when the official
    lists are present (train_val counts as train; validation is carved from it by patient). An image
    listed twice with another patient or other findings is an error naming both lines; exact repeats
    are a warning (``duplicates="drop"`` keeps the first)."""
    location = abspath(location)
    if location.is_file():
        root, csv = location.parent, location
    elif location.is_dir():
        root, csv = location, find_file(location, LABEL_FILES, "nih")
    else:
        raise not_found("nih", location)
    df = read_table(csv, usecols=lambda c: c in COLUMNS + DEMOGRAPHICS)
    require_columns(df, COLUMNS, csv)
    names = df["Image Index"].astype("str").str.strip()
    values = _finding_matrix(df["Finding Labels"], csv)
    findings = values.astype(np.int64) @ (1 << np.arange(values.shape[1], dtype=np.int64))  # A|B = B|A
    keep = duplicate_rows(pd.DataFrame({"Image Index": names, "Patient ID": df["Patient ID"],
                                        "Finding Labels": findings}), csv, duplicates, image="Image Index")
    if not keep.all():
        df, names, values = df[keep].reset_index(drop=True), names[keep].reset_index(drop=True), values[keep]
    paths = _image_paths(root, names)
    split = _official_split(root, names)
    view = df["View Position"]
    meta = make_meta(paths, df["Patient ID"].astype("str").str.strip(), names.str.replace(r"\.[^.]*$", "",
                     regex=True), view, split=split,
                     sex=df.get("Patient Gender"), age=df.get("Patient Age"))
    return finish("nih", NIH14, values, meta, views, csv)


def _finding_matrix(findings: pd.Series, csv: Path) -> np.ndarray:
    """``A|B`` → ones at A and B; "No Finding" → all zeros; an unknown name → error naming the line."""
    text = findings.astype("str").str.strip()
    blank = (text.isna() | (text == "")).to_numpy(dtype=bool)
    if blank.any():
        raise CxrlabError(f"{csv}: line {first_line(blank)}: empty 'Finding Labels' "
                          f"(use {NO_FINDING!r} for an image without findings)")
    dummies = text.str.replace(r"\s*\|\s*", "|", regex=True).str.get_dummies(sep="|")
    valid = set(NIH14.names) | {NO_FINDING}
    for name in dummies.columns:
        if name not in valid:
            line = first_line(dummies[name].to_numpy() > 0)
            raise CxrlabError(f"{csv}: line {line}: {unknown('finding', name, sorted(valid))}")
    return dummies.reindex(columns=list(NIH14.names), fill_value=0).to_numpy(dtype=np.float32)


def _image_paths(root: Path, names: pd.Series) -> pd.Series:
    """Absolute path of every image, found by one scan of the usual folders; absent images get the
    path they would have in ``images/`` so that reading them fails naming that path."""
    found: dict[str, str] = {}
    folders = [root / "images", root, *sorted(root.glob("images_*/images")), *sorted(root.glob("images_*"))]
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.lower().endswith(IMAGE_SUFFIXES) and entry.name not in found:
                    found[entry.name] = entry.path
    default = str(root / "images") + os.sep
    return pd.Series([found.get(name) or default + name for name in names], dtype="str")


def _official_split(root: Path, names: pd.Series) -> pd.Series | None:
    """train/test from ``train_val_list.txt`` / ``test_list.txt``; None when the lists are absent."""
    lists = {part: root / file for part, file in SPLIT_FILES.items() if (root / file).is_file()}
    if not lists:
        return None
    member = {part: names.isin(set(path.read_text().split())).to_numpy() for part, path in lists.items()}
    both = member.get("train", False) & member.get("test", False)
    if np.any(both):
        raise CxrlabError(f"nih: image {names[np.flatnonzero(both)[0]]!r} is in both "
                          f"{SPLIT_FILES['train']} and {SPLIT_FILES['test']}")
    split = np.full(len(names), None, dtype=object)
    for part, rows in member.items():
        split[rows] = part
    return pd.Series(split, dtype="str")
