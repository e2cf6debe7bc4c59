"""``data stats`` and ``data split`` through argparse, on the real NIH and CheXpert label files."""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pandas as pd
import pytest

from cxrlab.cli.data import add_data_commands
from cxrlab.data.splits import read_manifest
from cxrlab.errors import CxrlabError
from cxrlab.labels import CHEXPERT14

NIH_PREVALENCE = {"Infiltration": 19_894, "Effusion": 13_317, "Atelectasis": 11_559, "Nodule": 6_331,
                  "Mass": 5_782, "Pneumothorax": 5_302, "Consolidation": 4_667, "Pleural_Thickening": 3_385,
                  "Cardiomegaly": 2_776, "Emphysema": 2_516, "Edema": 2_303, "Fibrosis": 1_686,
                  "Pneumonia": 1_431, "Hernia": 227}


def run(argv, capsys) -> str:
    parser = argparse.ArgumentParser(prog="cxrlab")
    add_data_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def nih_dir(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("nih")
    os.symlink(shared_data / "nih" / "Data_Entry_2017_v2020.csv.gz", root / "Data_Entry_2017_v2020.csv.gz")
    return root


@pytest.fixture(scope="module")
def chexpert_dir(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("chexpert")
    os.symlink(shared_data / "chexpert" / "chexpert_train.csv.gz", root / "train.csv.gz")
    return root


@pytest.fixture(scope="module")
def chexpert_raw(shared_data):
    return pd.read_csv(shared_data / "chexpert" / "chexpert_train.csv.gz", usecols=list(CHEXPERT14.names))


def test_nih_stats_json_matches_published_numbers(nih_dir, capsys):
    stats = json.loads(run(["data", "stats", f"nih:{nih_dir}", "--json"], capsys))
    assert set(stats) == {"n_images", "n_patients", "views", "labels"}
    assert (stats["n_images"], stats["n_patients"]) == (112_120, 30_805)
    assert stats["views"] == {"PA": 67_310, "AP": 44_810}
    assert {name: c["positive"] for name, c in stats["labels"].items()} == NIH_PREVALENCE
    assert stats["labels"]["Effusion"] == {"positive": 13_317, "negative": 112_120 - 13_317, "uncertain": 0,
                                           "unknown": 0}


def test_nih_stats_text(nih_dir, capsys):
    out = run(["data", "stats", f"nih:{nih_dir}"], capsys)
    assert "images: 112,120" in out and "patients: 30,805" in out
    effusion = next(line for line in out.splitlines() if line.startswith("Effusion"))
    assert effusion.split()[1:5] == ["13,317", "98,803", "0", "0"]


def test_chexpert_raw_stats_count_each_kind_of_value(chexpert_dir, chexpert_raw, capsys):
    stats = json.loads(run(["data", "stats", f"chexpert:{chexpert_dir}", "--json"], capsys))
    assert (stats["n_images"], stats["n_patients"]) == (223_414, 64_540)
    for name in CHEXPERT14.names:
        column = chexpert_raw[name]
        assert stats["labels"][name] == {"positive": int((column == 1).sum()), "negative": int((column == 0).sum()),
                                         "uncertain": int((column == -1).sum()),
                                         "unknown": int(column.isna().sum())}, name


@pytest.mark.parametrize("policy", ["u_ones", "u_ignore"])
def test_chexpert_stats_after_a_policy(chexpert_dir, chexpert_raw, capsys, policy):
    stats = json.loads(run(["data", "stats", f"chexpert:{chexpert_dir}", "--json", "--policy", policy], capsys))
    column = chexpert_raw["Pleural Effusion"]
    pos, neg, unc, blank = ((column == 1).sum(), (column == 0).sum(), (column == -1).sum(), column.isna().sum())
    expected = ({"positive": pos + unc, "negative": neg + blank, "uncertain": 0, "unknown": 0} if policy == "u_ones"
                else {"positive": pos, "negative": neg + blank, "uncertain": 0, "unknown": unc})
    assert stats["labels"]["Pleural Effusion"] == {k: int(v) for k, v in expected.items()}


def test_stats_errors(tmp_path, capsys):
    (tmp_path / "l.csv").write_text("path,Edema\na.png,1\nb.png,-1\n")
    with pytest.raises(CxrlabError, match="'Edema' has 1 uncertain"):
        run(["data", "stats", f"csv:{tmp_path / 'l.csv'}", "--policy", "full"], capsys)
    with pytest.raises(CxrlabError, match="did you mean 'u_ones'"):
        run(["data", "stats", f"csv:{tmp_path / 'l.csv'}", "--policy", "uones"], capsys)
    with pytest.raises(CxrlabError, match="no images left after keeping views"):
        run(["data", "stats", f"csv:{tmp_path / 'l.csv'}", "--views", "frontal"], capsys)


def test_split_command_writes_a_checked_manifest(tmp_path, capsys):
    rows = ["path,patient_id,Edema,Mass"] + [f"img{i}.png,p{i // 2},{i % 3 == 0:d},{i % 5 == 0:d}"
                                             for i in range(40)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    out_file = tmp_path / "splits.csv"
    out = run(["data", "split", f"csv:{tmp_path / 'labels.csv'}", "--folds", "4", "--repeats", "2", "--seed", "3",
               "--out", str(out_file)], capsys)
    assert "2 × 4 folds over 40 images of 20 patients" in out
    from cxrlab.data.sources import parse_source

    manifest = read_manifest(out_file, parse_source(f"csv:{tmp_path / 'labels.csv'}"))
    assert len(manifest) == 80 and sorted(manifest["fold"].unique()) == [0, 1, 2, 3]
    assert manifest.groupby("repeat")["fold"].value_counts().eq(10).all()  # 5 patients × 2 images per fold
    # it prints the balance it achieved, per repeat: the worst relative prevalence deviation of a fold
    records = parse_source(f"csv:{tmp_path / 'labels.csv'}")
    positives = records.values == 1
    for repeat in (0, 1):
        fold = manifest["fold"].to_numpy()[manifest["repeat"].to_numpy() == repeat]
        worst = max((np.abs(positives[fold == k].mean(0) - positives.mean(0)) / positives.mean(0)).max()
                    for k in range(4))
        line = next(x for x in out.splitlines() if x.startswith(f"repeat {repeat}: "))
        assert f"prevalence {100 * worst:.2f} %" in line and "2 labels with >= 1 positive images" in line
        assert "of a fold's size 0.00 %" in line


def test_nih_stats_after_spml(nih_dir, capsys):
    """SPML: one observed positive per image; the 60,361 images without finding observe "No Finding"."""
    stats = json.loads(run(["data", "stats", f"nih:{nih_dir}", "--json", "--policy", "spml"], capsys))
    labels = stats["labels"]
    assert labels["No Finding"]["positive"] == 60_361
    assert sum(c["positive"] for c in labels.values()) == 112_120
    assert all(c["negative"] == 0 and c["positive"] + c["unknown"] == 112_120 for c in labels.values())
    assert all(labels[name]["positive"] <= count for name, count in NIH_PREVALENCE.items())


def test_stats_text_names_both_shares(chexpert_dir, chexpert_raw, capsys):
    """Blanks excluded, "No Finding" is positive on 100 % of its labelled images but on 10 % of all images."""
    out = run(["data", "stats", f"chexpert:{chexpert_dir}"], capsys)
    header = next(line for line in out.splitlines() if line.startswith("label"))
    assert header.split()[-2:] == ["pos/labelled", "pos/images"] and "prevalence" not in header
    for name in ("No Finding", "Pleural Effusion"):
        column = chexpert_raw[name]
        labelled = 100 * (column == 1).sum() / column.notna().sum()
        images = 100 * (column == 1).sum() / len(column)
        line = next(x for x in out.splitlines() if x.startswith(name + " "))
        assert line.split()[-2:] == [f"{labelled:.2f}%", f"{images:.2f}%"]
    assert "image prevalence, positive / all images" in out


def _chexpert_layout(root, shared_data, rows: int = 40):
    """A CheXpert-v1.0-small folder: the first rows of the real valid.csv, and (empty) image files."""
    table = pd.read_csv(shared_data / "chexpert" / "valid.csv").head(rows)
    (root / "CheXpert-v1.0-small").mkdir(parents=True)
    table.to_csv(root / "CheXpert-v1.0-small" / "valid.csv", index=False)
    for rel in table["Path"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    return root / "CheXpert-v1.0-small"


def test_folds_file_moves_with_the_data(tmp_path, shared_data, capsys):
    import shutil
    from types import SimpleNamespace

    from cxrlab.data.sources import parse_source
    from cxrlab.workflows.cross_validation import load_folds_file

    first = _chexpert_layout(tmp_path / "here", shared_data)
    folds = tmp_path / "folds.csv"
    run(["data", "split", f"chexpert:{first}", "--folds", "3", "--out", str(folds)], capsys)
    written = pd.read_csv(folds)
    assert written["path"].iloc[0] == "patient64541/study1/view1_frontal.jpg"  # relative to the source root
    before = read_manifest(folds, parse_source(f"chexpert:{first}"))

    shutil.move(str(tmp_path / "here"), str(tmp_path / "moved" / "elsewhere"))
    moved = parse_source(f"chexpert:{tmp_path / 'moved' / 'elsewhere' / 'CheXpert-v1.0-small'}")
    assert not str(moved.meta["path"].iloc[0]).startswith(str(tmp_path / "here"))
    after = read_manifest(folds, moved)
    assert after["path"].tolist() == moved.meta["path"].tolist()  # every row resolved to where the data is now
    assert after["fold"].tolist() == before["fold"].tolist()
    manifest = load_folds_file(folds, SimpleNamespace(index=moved.meta))
    assert manifest["path"].tolist() == moved.meta["path"].tolist()

    # an old manifest with absolute paths still loads
    old = tmp_path / "old.csv"
    after.to_csv(old, index=False)
    assert load_folds_file(old, SimpleNamespace(index=moved.meta))["path"].tolist() == after["path"].tolist()

    # a source with rows the manifest lacks: the error names them
    more = _chexpert_layout(tmp_path / "more", shared_data, rows=43)
    with pytest.raises(CxrlabError, match=r"repeat 0 lacks 3 images of the data: .*patient6457.*study1"):
        load_folds_file(folds, SimpleNamespace(index=parse_source(f"chexpert:{more}").meta))
    with pytest.raises(CxrlabError, match="no image of the source ends in a path the manifest lists"):
        read_manifest(folds, parse_source(f"nih:{shared_data / 'nih'}"))
