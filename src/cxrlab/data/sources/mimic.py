"""MIMIC-CXR-JPG (Johnson et al., 2019): metadata, labeller and split tables joined per image.

Labels are per study (CheXpert or NegBio labeller); every image of a study gets its study's labels.
A study the labeller file lacks keeps NaN (unknown) labels rather than being dropped silently.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ...config import Labeller, choose
from ...errors import CxrlabError
from ...labels import MIMIC14
from ..records import Records
from ._common import (abspath, find_file, finish, first_line, label_matrix, make_meta, not_found, read_table,
                      require_columns)

PREFIX = "mimic-cxr-2.0.0-"
LABELLERS = tuple(c.value for c in Labeller)  # the values of data.labeller, for listing
SPLITS = {"train": "train", "validate": "val", "test": "test"}
IDS = {"dicom_id": "str", "subject_id": "str", "study_id": "str"}


def load_mimic(location, views=None, labeller: str = "chexpert") -> Records:
    """Records over MIMIC14 with raw values; ``split`` from the split file (validate → val)."""
    labeller = choose(Labeller, labeller, "MIMIC labeller")
    root = abspath(location)
    if not root.is_dir():
        raise not_found("mimic", root)
    meta_csv = find_file(root, [PREFIX + "metadata.csv"], "mimic")
    images = read_table(meta_csv, usecols=lambda c: c in (*IDS, "ViewPosition"), dtype=IDS)
    require_columns(images, ("dicom_id", "subject_id", "study_id", "ViewPosition"), meta_csv)
    if len(images) == 0:
        raise CxrlabError(f"mimic: no images listed in {meta_csv}")
    studies = _study_labels(find_file(root, [f"{PREFIX}{labeller}.csv"], "mimic"))
    joined = images.merge(studies, on=["subject_id", "study_id"], how="left")
    split = _split(root, images["dicom_id"])
    subject, study, dicom = joined["subject_id"], joined["study_id"], joined["dicom_id"]
    paths = (str(root / "files") + "/p" + subject.str[:2] + "/p" + subject + "/s" + study + "/" + dicom
             + ".jpg")
    meta = make_meta(paths, subject, study, joined["ViewPosition"], split=split)
    values = joined[list(MIMIC14.names)].to_numpy(dtype=np.float32, na_value=np.nan)
    return finish(f"mimic-{labeller}", MIMIC14, values, meta, views, meta_csv)


def _study_labels(csv) -> pd.DataFrame:
    """One row per (subject, study) with validated label values."""
    df = read_table(csv, dtype={"subject_id": "str", "study_id": "str"})
    require_columns(df, ("subject_id", "study_id", *MIMIC14.names), csv)
    values = label_matrix(df, MIMIC14.names, csv)
    twice = df.duplicated(["subject_id", "study_id"]).to_numpy()
    if twice.any():
        line = first_line(twice)
        raise CxrlabError(f"{csv}: line {line}: study {df['study_id'].iloc[line - 2]} is listed twice")
    out = pd.DataFrame(values, columns=list(MIMIC14.names))
    out.insert(0, "study_id", df["study_id"].str.strip().to_numpy())
    out.insert(0, "subject_id", df["subject_id"].str.strip().to_numpy())
    return out


def _split(root, dicom_ids: pd.Series) -> pd.Series | None:
    csv = find_file(root, [PREFIX + "split.csv"], "mimic", required=False)
    if csv is None:
        return None
    df = read_table(csv, usecols=lambda c: c in ("dicom_id", "split"), dtype={"dicom_id": "str"})
    require_columns(df, ("dicom_id", "split"), csv)
    names = df["split"].astype("str").str.strip().str.lower()
    bad = ~names.isin(list(SPLITS)).to_numpy(dtype=bool)
    if bad.any():
        line = first_line(bad)
        raise CxrlabError(f"{csv}: line {line}: split {df['split'].iloc[line - 2]!r} is not one of "
                          f"{', '.join(SPLITS)}")
    lookup = pd.Series(names.map(SPLITS).to_numpy(), index=df["dicom_id"].str.strip().to_numpy())
    lookup = lookup[~lookup.index.duplicated()]
    return dicom_ids.str.strip().map(lookup).astype("str").reset_index(drop=True)
