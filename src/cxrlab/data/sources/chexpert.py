"""CheXpert (Irvin et al., AAAI 2019): ``train.csv`` and ``valid.csv`` of v1.0 or v1.0-small, and the
official test labels ``test_labels.csv`` (radiologist consensus, released later) where present.

The CSV paths start with the dataset folder (``CheXpert-v1.0-small/train/patient00001/study1/...``),
so they are resolved against the folder that contains that dataset folder, whether the user points
at it or at the dataset folder itself. ``test_labels.csv`` has a ``Path`` relative to the dataset
folder (``test/patient64741/study1/view1_frontal.jpg``) and the 14 observations, but no view columns:
frontal or lateral is read from the file name.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import CxrlabError
from ...labels import CHEXPERT14
from ..records import Records
from ._common import (abspath, duplicate_rows, find_file, finish, first_line, label_matrix, make_meta, not_found,
                      read_table, require_columns)

FILES = {"train": "train.csv", "val": "valid.csv", "test": "test_labels.csv"}
PATH_PATTERN = r"(?:^|/)(patient\d+)/(study\d+)/"


def load_chexpert(location, views=None, duplicates: str = "warn") -> Records:
    """Records over CHEXPERT14 with raw values (1, 0, -1, NaN) and ``split`` train (train.csv) /
    val (valid.csv) / test (test_labels.csv, when present). ``location`` is the dataset folder, its
    parent, or one of the CSV files. A path listed twice in a file with other labels is an error naming
    both lines; exact repeats are a warning (``duplicates="drop"`` keeps the first)."""
    tables = [_read_split(csv, part, duplicates) for csv, part in _label_files(abspath(location))]
    values = np.concatenate([v for v, _ in tables])
    meta = pd.concat([m for _, m in tables], ignore_index=True)
    return finish("chexpert", CHEXPERT14, values, meta, views, location)


def _label_files(location: Path) -> list[tuple[Path, str]]:
    if location.is_file():
        name = location.name.lower()
        return [(location, "val" if "valid" in name else "test" if "test" in name else "train")]
    if not location.is_dir():
        raise not_found("chexpert", location)
    for folder in [location, *sorted(location.glob("CheXpert-v1.0*"))]:
        found = [(find_file(folder, [name], "chexpert", required=False), part) for part, name in FILES.items()]
        found = [(path, part) for path, part in found if path is not None]
        if found:
            return found
    raise CxrlabError(f"chexpert: no train.csv or valid.csv (or .gz) in {location} "
                      "or its CheXpert-v1.0* folder")


def _read_split(csv: Path, part: str, duplicates: str = "warn") -> tuple[np.ndarray, pd.DataFrame]:
    df = read_table(csv)
    require_columns(df, ("Path", *(() if part == "test" else ("Frontal/Lateral",)), *CHEXPERT14.names), csv)
    values = label_matrix(df, CHEXPERT14.names, csv)
    rel = df["Path"].astype("str").str.strip().str.replace("\\", "/", regex=False)
    ids = rel.str.extract(PATH_PATTERN)
    bad = ids[0].isna().to_numpy(dtype=bool)
    if bad.any():
        line = first_line(bad)
        raise CxrlabError(f"{csv}: line {line}: path {rel.iloc[line - 2]!r} does not contain "
                          "patientNNNNN/studyN/")
    # the patient is part of the path, so only the labels can clash: one number per row (blank, 0, 1, -1
    # as base-4 digits), so 1 and 1.0 agree
    digits = np.select([np.isnan(values), values == 0, values == 1], [0, 1, 2], 3).astype(np.int64)
    labels = digits @ (4 ** np.arange(values.shape[1], dtype=np.int64))
    keep = duplicate_rows(pd.DataFrame({"Path": rel, "labels": labels}), csv, duplicates, image="Path")
    if not keep.all():
        df, values = df[keep].reset_index(drop=True), values[keep]
        rel, ids = rel[keep].reset_index(drop=True), ids[keep].reset_index(drop=True)
    if "Frontal/Lateral" in df.columns:
        side = df["Frontal/Lateral"].astype("str").str.strip()
    else:  # test_labels.csv: view1_frontal.jpg / view2_lateral.jpg
        side = rel.str.extract(r"_(frontal|lateral)\.[^/]*$", flags=re.IGNORECASE)[0].str.capitalize()
        side = side.fillna("unknown")
    group = side.str.lower().where(side.str.lower().isin(["frontal", "lateral"]), "unknown").fillna("unknown")
    position = (df["AP/PA"].astype("str").str.strip() if "AP/PA" in df.columns
                else pd.Series(pd.NA, index=df.index, dtype="str"))
    view = position.where((group == "frontal") & position.notna() & (position != ""), side)
    meta = make_meta(_absolute(csv.parent, rel), ids[0], ids[0] + "/" + ids[1], view,
                     frontal_lateral=group, split=pd.Series(part, index=df.index),
                     sex=df.get("Sex"), age=df.get("Age"))
    return values, meta


def _absolute(folder: Path, rel: pd.Series) -> pd.Series:
    """``CheXpert-v1.0-small/train/...`` below ``folder``'s parent when ``folder`` is that dataset
    folder (the official layout: the CSV sits inside it), below ``folder`` otherwise."""
    head = rel.str.split("/", n=1).str[0]
    base = pd.Series(np.where(head == folder.name, str(folder.parent), str(folder)), index=rel.index)
    return (base + "/" + rel).where(~rel.str.startswith("/"), rel)
