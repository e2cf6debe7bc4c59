"""Sources on the real NIH and CheXpert label files and on small fake layouts built in tmp_path."""
from __future__ import annotations

import gzip
import os
import types

import numpy as np
import pandas as pd
import pytest

from cxrlab.data.records import Records
from cxrlab.data.sources import filter_views, parse_source
from cxrlab.errors import CxrlabError
from cxrlab.labels import CHEXPERT14, MIMIC14, NIH14, LabelSpace

NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")


# --- NIH -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nih_real(shared_data, tmp_path_factory):
    """The real 112,120-row label file in a folder that also holds one real image."""
    root = tmp_path_factory.mktemp("nih")
    os.symlink(shared_data / "nih" / "Data_Entry_2017_v2020.csv.gz", root / "Data_Entry_2017_v2020.csv.gz")
    (root / "images_001" / "images").mkdir(parents=True)
    os.symlink(shared_data / "nih" / "00000001_000.png", root / "images_001" / "images" / "00000001_000.png")
    return root, parse_source(f"nih:{root}")


def test_nih_real_counts_match_the_published_prevalence(nih_real):
    _, records = nih_real
    assert isinstance(records, Records) and records.labels == NIH14
    assert len(records) == 112_120
    assert records.meta["patient_id"].nunique() == 30_805
    positives = dict(zip(NIH14.names, records.values.sum(0).astype(int)))
    assert positives == {"Infiltration": 19_894, "Effusion": 13_317, "Atelectasis": 11_559, "Nodule": 6_331,
                         "Mass": 5_782, "Pneumothorax": 5_302, "Consolidation": 4_667,
                         "Pleural_Thickening": 3_385, "Cardiomegaly": 2_776, "Emphysema": 2_516,
                         "Edema": 2_303, "Fibrosis": 1_686, "Pneumonia": 1_431, "Hernia": 227}
    assert int((records.values.sum(1) == 0).sum()) == 60_361  # "No Finding" = none of the 14
    assert not np.isnan(records.values).any()  # NIH labels are complete


def test_nih_real_first_row_and_image_lookup(nih_real):
    root, records = nih_real
    row = records.meta.iloc[0]
    assert (row["patient_id"], row["study_id"], row["view"], row["frontal_lateral"]) == (
        "1", "00000001_000", "PA", "frontal")
    assert records.values[0].tolist() == [float(n == "Cardiomegaly") for n in NIH14.names]
    assert row["path"] == str(root / "images_001" / "images" / "00000001_000.png")
    assert records.read(0).shape == (512, 512)
    # the second image is not on disk: loading was fine, reading names it
    assert records.meta["path"].iloc[1] == str(root / "images" / "00000001_001.png")
    with pytest.raises(CxrlabError, match="00000001_001.png"):
        records.read(1)
    assert "split" not in records.meta.columns  # no official lists in this folder


def _nih_fake(root, rows, name="Data_Entry_2017.csv"):
    root.mkdir(parents=True, exist_ok=True)
    lines = [f"{image},{findings},0,{patient},50,M,{view},2500,2048,0.14,0.14\n"
             for image, findings, patient, view in rows]
    (root / name).write_text(NIH_HEADER + "".join(lines))
    return root


FAKE_ROWS = [("a_000.png", "Effusion|Mass", 7, "PA"), ("a_001.png", "No Finding", 7, "AP"),
             ("b_000.png", "Hernia", 8, "PA")]


@pytest.mark.parametrize("layout", ["images", "root", "images_002/images"])
def test_nih_image_layouts(shared_data, tmp_path, layout):
    root = _nih_fake(tmp_path / "nih", FAKE_ROWS)
    folder = root if layout == "root" else root / layout
    folder.mkdir(parents=True, exist_ok=True)
    os.symlink(shared_data / "nih" / "00000001_000.png", folder / "b_000.png")
    records = parse_source(f"nih:{root}")
    assert records.meta["path"].tolist()[2] == str(folder / "b_000.png")
    assert records.read(2).shape == (512, 512)
    assert records.values[0, [NIH14.index("Effusion"), NIH14.index("Mass")]].tolist() == [1, 1]
    assert records.values[0].sum() == 2 and records.values[1].sum() == 0


def test_nih_official_split_lists(tmp_path):
    root = _nih_fake(tmp_path / "nih", FAKE_ROWS)
    (root / "train_val_list.txt").write_text("a_000.png\na_001.png\n")
    (root / "test_list.txt").write_text("b_000.png\n")
    assert parse_source(f"nih:{root}").meta["split"].tolist() == ["train", "train", "test"]


def test_nih_csv_given_directly_and_gzipped(tmp_path):
    root = _nih_fake(tmp_path / "nih", FAKE_ROWS)
    gz = root / "Data_Entry_2017_v2020.csv.gz"
    gz.write_bytes(gzip.compress((root / "Data_Entry_2017.csv").read_bytes()))
    (root / "Data_Entry_2017.csv").unlink()
    assert len(parse_source(f"nih:{gz}")) == 3


def test_nih_unknown_finding_names_line_and_closest_label(tmp_path):
    root = _nih_fake(tmp_path / "nih", FAKE_ROWS + [("c_000.png", "Cardiomegaly|Efusion", 9, "PA")])
    with pytest.raises(CxrlabError, match=r"line 5.*'Efusion'.*did you mean 'Effusion'"):
        parse_source(f"nih:{root}")


def test_nih_missing_column_is_named(tmp_path):
    root = tmp_path / "nih"
    root.mkdir()
    (root / "Data_Entry_2017.csv").write_text("Image Index,Patient ID,View Position\na.png,1,PA\n")
    with pytest.raises(CxrlabError, match="'Finding Labels' is missing"):
        parse_source(f"nih:{root}")


def test_view_filters_and_empty_result(tmp_path):
    root = _nih_fake(tmp_path / "nih", FAKE_ROWS)
    assert parse_source(f"nih:{root}", views="AP").meta["path"].str.endswith("a_001.png").tolist() == [True]
    assert len(parse_source(f"nih:{root}", views=["PA", "AP"])) == 3
    assert len(parse_source(f"nih:{root}", views="frontal")) == 3
    with pytest.raises(CxrlabError, match="no images left after keeping views"):
        parse_source(f"nih:{root}", views="lateral")
    with pytest.raises(CxrlabError, match="did you mean 'PA'"):
        parse_source(f"nih:{root}", views="PAA")


# --- CheXpert --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chexpert_real(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("chexpert")
    os.symlink(shared_data / "chexpert" / "chexpert_train.csv.gz", root / "train.csv.gz")
    os.symlink(shared_data / "chexpert" / "valid.csv", root / "valid.csv")
    return root, parse_source(f"chexpert:{root}")


def test_chexpert_real_train_and_valid(shared_data, chexpert_real):
    root, records = chexpert_real
    assert records.labels == CHEXPERT14
    assert records.meta["split"].value_counts().to_dict() == {"train": 223_414, "val": 234}
    row = records.meta.iloc[0]
    assert row["path"] == str(root / "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg")
    assert (row["patient_id"], row["study_id"], row["view"]) == ("patient00001", "patient00001/study1", "AP")
    # first line: No Finding 1, Pneumothorax 0, Support Devices 1, every other label blank
    first = dict(zip(CHEXPERT14.names, records.values[0].tolist()))
    assert first.pop("No Finding") == 1 and first.pop("Pneumothorax") == 0 and first.pop("Support Devices") == 1
    assert all(np.isnan(v) for v in first.values())
    raw = pd.read_csv(shared_data / "chexpert" / "chexpert_train.csv.gz")
    column = CHEXPERT14.index("Pleural Effusion")
    train = records.values[:223_414, column]
    assert int((train == -1).sum()) == int((raw["Pleural Effusion"] == -1).sum())
    assert int(np.isnan(train).sum()) == int(raw["Pleural Effusion"].isna().sum())


def test_chexpert_view_filters(shared_data, chexpert_real):
    root, records = chexpert_real
    columns = ["Frontal/Lateral", "AP/PA"]
    raw = pd.concat([pd.read_csv(shared_data / "chexpert" / "chexpert_train.csv.gz", usecols=columns),
                     pd.read_csv(shared_data / "chexpert" / "valid.csv", usecols=columns)])
    frontal = parse_source(f"chexpert:{root}", views="frontal")
    assert len(frontal) == int((raw["Frontal/Lateral"] == "Frontal").sum())
    pa = filter_views(records, "PA")  # what parse_source(..., views="PA") applies
    assert len(pa) == int(((raw["Frontal/Lateral"] == "Frontal") & (raw["AP/PA"] == "PA")).sum())
    assert set(pa.meta["view"]) == {"PA"}


@pytest.mark.parametrize("point_at", ["dataset folder", "its parent", "the csv"])
def test_chexpert_paths_resolve_from_either_folder(shared_data, tmp_path, point_at):
    dataset = tmp_path / "CheXpert-v1.0-small"
    dataset.mkdir()
    os.symlink(shared_data / "chexpert" / "valid.csv", dataset / "valid.csv")
    location = {"dataset folder": dataset, "its parent": tmp_path, "the csv": dataset / "valid.csv"}[point_at]
    records = parse_source(f"chexpert:{location}")
    assert len(records) == 234 and set(records.meta["split"]) == {"val"}
    assert records.meta["path"].iloc[0] == str(tmp_path / "CheXpert-v1.0-small/valid/patient64541/study1/"
                                                         "view1_frontal.jpg")


def _chexpert_fake(shared_data, tmp_path, edit):
    """valid.csv's first 3 rows, with ``edit(df)`` applied, written as tmp/valid.csv."""
    df = pd.read_csv(shared_data / "chexpert" / "valid.csv", nrows=3, dtype=str)
    edit(df)
    df.to_csv(tmp_path / "valid.csv", index=False)
    return tmp_path


@pytest.mark.parametrize("bad", ["2.0", "yes"])
def test_chexpert_bad_value_names_file_row_and_column(shared_data, tmp_path, bad):
    root = _chexpert_fake(shared_data, tmp_path, lambda df: df.__setitem__("Edema", ["0.0", "1.0", bad]))
    with pytest.raises(CxrlabError, match=rf"valid.csv: row 3 \(line 4\), column 'Edema'.*value '?{bad}'? is not"):
        parse_source(f"chexpert:{root}")


def test_chexpert_path_without_patient_is_an_error(shared_data, tmp_path):
    def edit(df):
        df.loc[1, "Path"] = "CheXpert-v1.0-small/valid/somebody/study1/view1_frontal.jpg"
    root = _chexpert_fake(shared_data, tmp_path, edit)
    with pytest.raises(CxrlabError, match="line 3: path .*somebody"):
        parse_source(f"chexpert:{root}")


def test_chexpert_missing_label_column(shared_data, tmp_path):
    root = _chexpert_fake(shared_data, tmp_path, lambda df: df.pop("Fracture"))
    with pytest.raises(CxrlabError, match="'Fracture' is missing"):
        parse_source(f"chexpert:{root}")


def _chexpert_with_test_labels(root, test_rows=None):
    """A CheXpert-v1.0-small folder with 2-row train.csv / valid.csv and the official test labels'
    layout: test_labels.csv with a Path relative to the dataset folder and the 14 observations only."""
    dataset = root / "CheXpert-v1.0-small"
    dataset.mkdir()
    for name, folder, first in (("train.csv", "train", 1), ("valid.csv", "valid", 64541)):
        rows = [{"Path": f"CheXpert-v1.0-small/{folder}/patient{first + i:05d}/study1/view1_frontal.jpg",
                 "Sex": "Female", "Age": 50, "Frontal/Lateral": "Frontal", "AP/PA": "AP",
                 **{n: 0.0 for n in CHEXPERT14.names}} for i in range(2)]
        pd.DataFrame(rows).to_csv(dataset / name, index=False)
    if test_rows is None:
        test_rows = [{"Path": "test/patient64741/study1/view1_frontal.jpg", **{n: 0 for n in CHEXPERT14.names},
                      "Cardiomegaly": 1},
                     {"Path": "test/patient64741/study1/view2_lateral.jpg", **{n: 0 for n in CHEXPERT14.names},
                      "Cardiomegaly": 1},
                     {"Path": "test/patient64742/study1/view1_frontal.jpg", **{n: 0 for n in CHEXPERT14.names},
                      "Edema": 1}]
    pd.DataFrame(test_rows).to_csv(dataset / "test_labels.csv", index=False)
    return dataset


def test_chexpert_official_test_labels_are_the_test_part(tmp_path):
    dataset = _chexpert_with_test_labels(tmp_path)
    for location in (dataset, tmp_path):  # the dataset folder or its parent
        records = parse_source(f"chexpert:{location}")
        assert records.meta["split"].tolist() == ["train", "train", "val", "val", "test", "test", "test"]
        test = records.meta[records.meta["split"] == "test"]
        assert test["path"].tolist() == [str(dataset / "test/patient64741/study1/view1_frontal.jpg"),
                                         str(dataset / "test/patient64741/study1/view2_lateral.jpg"),
                                         str(dataset / "test/patient64742/study1/view1_frontal.jpg")]
        assert test["patient_id"].tolist() == ["patient64741", "patient64741", "patient64742"]
        assert test["frontal_lateral"].tolist() == ["frontal", "lateral", "frontal"]  # from the file names
        values = records.values[records.meta["split"].to_numpy() == "test"]
        assert values[:, CHEXPERT14.index("Cardiomegaly")].tolist() == [1, 1, 0]
        assert values[:, CHEXPERT14.index("Edema")].tolist() == [0, 0, 1]
    frontal = parse_source(f"chexpert:{dataset}", views="frontal")
    assert (frontal.meta["split"] == "test").sum() == 2
    split = parse_source(f"chexpert:{dataset}").meta["split"]
    assert [int((split == k).sum()) for k in ("train", "val", "test")] == [2, 2, 3]
    # a recipe's official split then keeps valid.csv as validation and tests on the official test labels
    from cxrlab.config import Recipe
    from cxrlab.data.prepared import split_rows

    recipe = Recipe()
    recipe.data.split = "official"
    rows = split_rows(recipe, types.SimpleNamespace(index=parse_source(f"chexpert:{dataset}").meta))
    assert {k: v.tolist() for k, v in rows.items()} == {"train": [0, 1], "val": [2, 3], "test": [4, 5, 6]}
    alone = parse_source(f"chexpert:{dataset / 'test_labels.csv'}")  # the file itself
    assert set(alone.meta["split"]) == {"test"} and len(alone) == 3


def test_chexpert_test_labels_missing_column_names_the_file(tmp_path):
    rows = [{"Path": "test/patient64741/study1/view1_frontal.jpg", **{n: 0 for n in CHEXPERT14.names
                                                                       if n != "Edema"}}]
    _chexpert_with_test_labels(tmp_path, rows)
    with pytest.raises(CxrlabError, match=r"test_labels.csv: required column 'Edema' is missing"):
        parse_source(f"chexpert:{tmp_path}")


# --- MIMIC-CXR-JPG (fake files: the real ones are credentialed) -------------------------------------

def _mimic_fake(root, split_rows=None, labeller="chexpert"):
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({
        "dicom_id": ["d1", "d2", "d3", "d4"], "subject_id": [10000032, 10000032, 11000011, 12000001],
        "study_id": [50000001, 50000001, 50000002, 50000003], "PerformedProcedureStepDescription": "CHEST",
        "ViewPosition": ["PA", "LATERAL", "AP", ""], "Rows": 3056, "Columns": 2544,
    }).to_csv(root / "mimic-cxr-2.0.0-metadata.csv", index=False)
    labels = pd.DataFrame({"subject_id": [10000032, 11000011], "study_id": [50000001, 50000002]})
    for name in MIMIC14.names:
        labels[name] = np.nan
    labels.loc[0, "Edema"], labels.loc[0, "Cardiomegaly"], labels.loc[1, "No Finding"] = 1.0, -1.0, 1.0
    if labeller == "negbio":
        labels.loc[0, "Edema"] = 0.0
    labels.to_csv(root / f"mimic-cxr-2.0.0-{labeller}.csv", index=False)
    split = split_rows or ["train", "train", "validate", "test"]
    pd.DataFrame({"dicom_id": ["d1", "d2", "d3", "d4"], "study_id": 0, "subject_id": 0, "split": split}).to_csv(
        root / "mimic-cxr-2.0.0-split.csv", index=False)
    return root


def test_mimic_join_paths_split_and_views(tmp_path):
    root = _mimic_fake(tmp_path / "mimic")
    records = parse_source(f"mimic:{root}")
    assert records.labels == MIMIC14 and len(records) == 4
    assert records.meta["path"].iloc[0] == str(root / "files/p10/p10000032/s50000001/d1.jpg")
    assert records.meta["split"].tolist() == ["train", "train", "val", "test"]
    assert records.meta["view"].tolist() == ["PA", "LATERAL", "AP", "unknown"]
    assert records.meta["frontal_lateral"].tolist() == ["frontal", "lateral", "frontal", "unknown"]
    edema, cardio = MIMIC14.index("Edema"), MIMIC14.index("Cardiomegaly")
    assert records.values[:2, edema].tolist() == [1, 1]  # both images of the study get its labels
    assert records.values[:2, cardio].tolist() == [-1, -1]
    assert records.values[2, MIMIC14.index("No Finding")] == 1
    assert np.isnan(records.values[3]).all()  # study absent from the labeller file: unknown
    assert parse_source(f"mimic:{root}", views="lateral").meta["path"].str.endswith("d2.jpg").tolist() == [True]
    assert len(parse_source(f"mimic:{root}", views="frontal")) == 2


def test_mimic_negbio_labeller(tmp_path):
    root = _mimic_fake(tmp_path / "mimic", labeller="negbio")
    records = parse_source(f"mimic:{root}", labeller="negbio")
    assert records.values[0, MIMIC14.index("Edema")] == 0
    with pytest.raises(CxrlabError, match="mimic-cxr-2.0.0-chexpert.csv"):
        parse_source(f"mimic:{root}")  # no chexpert-labeller file there
    with pytest.raises(CxrlabError, match="did you mean 'negbio'"):
        parse_source(f"mimic:{root}", labeller="negbi")


def test_mimic_bad_split_value(tmp_path):
    root = _mimic_fake(tmp_path / "mimic", split_rows=["train", "train", "valid8", "test"])
    with pytest.raises(CxrlabError, match="line 4: split 'valid8'"):
        parse_source(f"mimic:{root}")


# --- generic CSV and folder ------------------------------------------------------------------------

def test_csv_source_relative_paths_and_numeric_label_columns(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labels.csv").write_text(
        "path,patient_id,Edema,Mass,comment\nimgs/x.png,p1,1,0,ok\n/abs/y.png,p1,,1,fine\nimgs/z.png,p2,-1,0,\n")
    records = parse_source(f"csv:{tmp_path / 'data' / 'labels.csv'}")
    assert records.labels.names == ("Edema", "Mass")  # 'comment' is text, not a label column
    assert records.meta["path"].tolist() == [str(tmp_path / "data" / "imgs" / "x.png"), "/abs/y.png",
                                             str(tmp_path / "data" / "imgs" / "z.png")]
    assert records.meta["patient_id"].tolist() == ["p1", "p1", "p2"]
    np.testing.assert_array_equal(records.values, [[1, 0], [np.nan, 1], [-1, 0]])


def test_csv_source_labels_list_and_stem_patients(tmp_path):
    csv = tmp_path / "l.csv"
    csv.write_text("path,weight,Edema,Mass,age,sex\na/x.png,63,1,0,63,F\nb/y.dcm,70,0,1,,M\n")
    records = parse_source(f"csv:{csv}", labels=["Mass"])
    assert records.labels.names == ("Mass",)
    assert records.meta["patient_id"].tolist() == ["x", "y"]
    # age and sex are meta columns (subgroup evaluation), never labels
    assert records.meta["sex"].tolist() == ["female", "male"]
    np.testing.assert_array_equal(records.meta["age"], [63.0, np.nan])
    with pytest.raises(CxrlabError, match="'weight'.*not one of 1, 0, -1"):
        parse_source(f"csv:{csv}")  # without labels=, the numeric 'weight' column is taken as a label
    with pytest.raises(CxrlabError, match="did you mean 'Edema'"):
        parse_source(f"csv:{csv}", labels=["Edma"])


def test_csv_source_bad_value(tmp_path):
    csv = tmp_path / "l.csv"
    csv.write_text("path,Edema\nx.png,1\ny.png,yes\nz.png,0\n")
    with pytest.raises(CxrlabError, match=r"l.csv: row 2 \(line 3\), column 'Edema'.*'yes'"):
        parse_source(f"csv:{csv}")


def test_folder_source(shared_data, tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    os.symlink(shared_data / "nih" / "00000001_000.png", tmp_path / "a" / "one.png")
    os.symlink(shared_data / "covid" / "16747_3_1.jpg", tmp_path / "a" / "b" / "two.JPG")
    os.symlink(shared_data / "dicom" / "monochrome1_example.dcm", tmp_path / "three.dcm")
    (tmp_path / "notes.txt").write_text("not an image")
    records = parse_source(f"folder:{tmp_path}")
    assert len(records) == 3 and records.values.shape == (3, 0)
    assert sorted(records.meta["patient_id"]) == ["one", "three", "two"]
    assert set(records.meta["view"]) == {"unknown"} and set(records.meta["frontal_lateral"]) == {"unknown"}
    assert [records.read(i).ndim for i in range(3)] == [2, 2, 2]
    labelled = parse_source(f"folder:{tmp_path}", labels="nih14")
    assert labelled.labels == NIH14 and np.isnan(labelled.values).all() and labelled.values.shape == (3, 14)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CxrlabError, match="no images"):
        parse_source(f"folder:{tmp_path / 'empty'}")


# --- the parser ------------------------------------------------------------------------------------

def test_parse_source_errors(tmp_path):
    with pytest.raises(CxrlabError, match="did you mean 'chexpert'"):
        parse_source("chexpret:/data")
    with pytest.raises(CxrlabError, match="expected KIND:LOCATION"):
        parse_source("/data/ChestX-ray14")
    with pytest.raises(CxrlabError, match="folder not found"):
        parse_source(f"nih:{tmp_path / 'absent'}")
    with pytest.raises(CxrlabError, match="none of Data_Entry_2017_v2020.csv"):
        parse_source(f"nih:{tmp_path}")


def test_synthetic_is_delegated(monkeypatch):
    calls = []

    def load_synthetic(spec):
        calls.append(spec)
        meta = pd.DataFrame({"path": ["s0", "s1"], "patient_id": ["0", "1"], "study_id": ["0", "1"],
                             "view": ["PA", "LL"]})
        return Records("synthetic", LabelSpace("two", ("a", "b")), np.zeros((2, 2), np.float32), meta)

    import cxrlab.data.sources as sources

    monkeypatch.setattr(sources, "load_synthetic", load_synthetic)
    assert len(parse_source("synthetic:200")) == 2 and calls == ["200"]
    assert parse_source("synthetic:200", views="lateral").meta["path"].tolist() == ["s1"]


def test_view_groups_of_mimic_view_positions():
    from cxrlab.data.sources._common import view_group

    views = pd.Series(["PA", "AP AXIAL", "PA LLD", "LATERAL", "XTABLE LATERAL", "LL", "LAO", "", None, "Frontal"])
    assert view_group(views).tolist() == ["frontal", "frontal", "frontal", "lateral", "lateral", "lateral",
                                          "other", "unknown", "unknown", "frontal"]
