"""Study-level evaluation on a CheXpert-layout folder: the real valid.csv labels (234 images, 200 studies)
with generated images, the aggregation rule (max, mean) against a direct pandas/numpy computation, the
study metrics against scikit-learn, and a tiny train + evaluate showing the protocol line and both levels."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from cxrlab.cli import main
from cxrlab.config import load_recipe
from cxrlab.data.sources import parse_source
from cxrlab.errors import CxrlabError
from cxrlab.evaluation.protocol import merge_protocols, protocol_line
from cxrlab.evaluation.tables import aggregate, write_comparison
from cxrlab.labels import CHEXPERT5
from cxrlab.metrics.study import aggregate_studies, study_level, study_report
from cxrlab.metrics.thresholds import fit_thresholds
from cxrlab.workflows.cross_validation import _summary_markdown

FIVE = list(CHEXPERT5.names)


@pytest.fixture(scope="module")
def chexpert_folder(shared_data, tmp_path_factory):
    """CheXpert-v1.0-small/ with the real valid.csv, the first 80 rows of the real train.csv, and a
    generated 40×48 grey JPEG at every listed path."""
    root = tmp_path_factory.mktemp("chexpert_study")
    dataset = root / "CheXpert-v1.0-small"
    dataset.mkdir()
    valid = pd.read_csv(shared_data / "chexpert" / "valid.csv")
    train = pd.read_csv(shared_data / "chexpert" / "chexpert_train.csv.gz", nrows=80)
    valid.to_csv(dataset / "valid.csv", index=False)
    train.to_csv(dataset / "train.csv", index=False)
    rng = np.random.default_rng(0)
    for rel in [*valid["Path"], *train["Path"]]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 40), dtype=np.uint8)).save(path)
    return root, valid


def test_valid_csv_has_200_studies_with_labels_repeated_per_image(chexpert_folder):
    root, valid = chexpert_folder
    records = parse_source(f"chexpert:{root}")
    val = records.meta["split"].to_numpy() == "val"
    ids = records.meta["study_id"].to_numpy()[val]
    assert val.sum() == 234 and len(set(ids)) == 200
    assert study_level("auto", ids) and not study_level("auto", [f"s{i}" for i in range(5)])
    assert study_level("both", [f"s{i}" for i in range(5)]) and not study_level("image", ids)
    with pytest.raises(CxrlabError, match="no study_id column"):
        study_level("both", None)
    with pytest.raises(CxrlabError, match="eval.level.*'both'"):
        load_recipe("chexpert5_bce_resnet50", ["eval.level=bothh"])
    # labels are per study: every image of a study carries the same 14 values
    table = pd.DataFrame(records.values[val], columns=records.labels.names).assign(study=ids)
    assert (table.groupby("study").nunique() == 1).all().all()


@pytest.mark.parametrize("how", ["max", "mean"])
def test_study_aggregation_and_metrics_equal_a_direct_computation(chexpert_folder, how):
    _, valid = chexpert_folder
    study = valid["Path"].str.extract(r"(patient\d+/study\d+)/")[0].to_numpy()
    targets = valid[FIVE].to_numpy(dtype=float)
    rng = np.random.default_rng(1)
    probs = np.clip(0.35 * targets + rng.uniform(0, 0.65, targets.shape), 0, 1)  # informative, not perfect
    ps, ts, ms, ids = aggregate_studies(probs, targets, np.ones_like(targets), study, how)
    assert ps.shape == (200, 5) and ids.size == 200 and ms.all()
    # the direct computation: pandas groupby in order of first appearance
    frame = pd.DataFrame(probs, columns=FIVE).assign(study=study)
    expected = frame.groupby("study", sort=False)[FIVE].agg(how)
    assert list(expected.index) == list(ids)
    np.testing.assert_allclose(ps, expected.to_numpy())
    np.testing.assert_array_equal(ts, pd.DataFrame(targets, columns=FIVE).assign(study=study)
                                  .groupby("study", sort=False)[FIVE].max().to_numpy())
    # a two-image study: max/mean of exactly its two rows
    j = int(np.flatnonzero(pd.Series(study).duplicated())[0])
    rows = np.flatnonzero(study == study[j])
    k = list(ids).index(study[j])
    np.testing.assert_allclose(ps[k], probs[rows].max(0) if how == "max" else probs[rows].mean(0))

    # study metrics: scikit-learn on the aggregated rows, thresholds fitted on the validation studies
    val_probs = np.clip(probs[::-1] * 0.9 + 0.05, 0, 1)
    report = study_report(probs, targets, np.ones_like(targets), study, FIVE, how=how,
                          val=(val_probs, targets[::-1], np.ones_like(targets), study[::-1]))
    assert report["n_studies"] == 200 and report["n_images"] == 234 and report["aggregation"] == how
    vp, vt, _, _ = aggregate_studies(val_probs, targets[::-1], np.ones_like(targets), study[::-1], how)
    thr = fit_thresholds(vp, vt)
    aucs = [roc_auc_score(ts[:, j], ps[:, j]) for j in range(5)]
    assert report["macro_auc"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert report["map"] == pytest.approx(np.mean([average_precision_score(ts[:, j], ps[:, j]) for j in range(5)]))
    assert report["macro_f1"] == pytest.approx(f1_score(ts, ps >= thr, average="macro", zero_division=0))
    assert report["micro_f1_at_0.5"] == pytest.approx(f1_score(ts, ps >= 0.5, average="micro", zero_division=0))
    for j, name in enumerate(FIVE):
        assert report["per_label"][name]["threshold"] == pytest.approx(thr[j])
        assert report["per_label"][name]["n_positive"] == int(ts[:, j].sum())


def test_masked_labels_are_known_when_any_image_knows_them():
    probs = np.array([[0.2], [0.9], [0.4]])
    targets = np.array([[np.nan], [1.0], [0.0]])  # a masked entry may hold anything
    mask = np.array([[0.0], [1.0], [0.0]])
    ps, ts, ms, ids = aggregate_studies(probs, targets, mask, ["a", "a", "b"], "max")
    assert ids.tolist() == ["a", "b"]
    np.testing.assert_array_equal(ps[:, 0], [0.9, 0.4])
    np.testing.assert_array_equal(ts[:, 0], [1.0, 0.0])
    np.testing.assert_array_equal(ms[:, 0], [1.0, 0.0])  # study b: no image knows the label
    with pytest.raises(CxrlabError, match="eval.study_aggregation.*'max'"):
        aggregate_studies(probs, targets, mask, ["a", "a", "b"], "maximum")
    with pytest.raises(CxrlabError, match="3 study ids for 2 images"):
        aggregate_studies(probs[:2], targets[:2], mask[:2], ["a", "a", "b"])


def test_merged_protocol_and_comparison_line():
    runs = [{"split": "1×2 CV", "level": "image + study (max of a study's images)", "image_size": 32,
             "resize": "pad", "policy": "u_ones", "labels": 5, "images": n, "patients": n - 30, "studies": n - 20,
             "run": f"r0f{k}"} for k, n in enumerate((110, 124))]
    merged = merge_protocols(runs)
    assert merged["images"] == "110–124" and merged["labels"] == 5 and "run" not in merged
    assert protocol_line(merged).endswith("evaluated: 110–124 images, 80–94 patients, 90–104 studies")
    reports = [{"macro_auc": 0.6 + 0.1 * k, "study": {"macro_auc": 0.7 + 0.1 * k, "n_studies": 90},
                "protocol": run, "per_label": {}} for k, run in enumerate(runs)]
    agg = aggregate(reports)
    assert agg["study/macro_auc"]["mean"] == pytest.approx(0.75) and agg["study/macro_auc"]["n"] == 2
    assert agg["protocol"] == merged
    summary = _summary_markdown("r", agg, 1, 2)  # cv's summary.md
    assert summary.splitlines()[2] == protocol_line(merged) + " (counts per run)"
    assert "| study/macro_auc | 0.7500 ± 0.0707 |" in summary


def test_train_and_evaluate_report_both_levels(chexpert_folder, tmp_path):
    root, _ = chexpert_folder
    overrides = [f"data.source=chexpert:{root}", "data.image_size=32", "model.backbone=test_resnet",
                 "model.pretrained=false", "train.epochs=1", "train.batch_size=32", "eval.bootstrap=20",
                 "data.val_fraction=0.3", "data.num_workers=0", "train.amp=off", f"data.cache_dir={tmp_path / 'c'}"]
    assert main(["train", "chexpert5_bce_resnet50", "--out", str(tmp_path / "run"), *overrides]) == 0
    report = tmp_path / "run" / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n_images"] == 234 and metrics["study"]["n_studies"] == 200
    assert metrics["study"]["n_images"] == 234 and list(metrics["study"]["per_label"]) == FIVE
    assert "validation part's studies" in metrics["study"]["threshold_source"]
    text = (report / "report.md").read_text()
    line = text.splitlines()[2]
    assert line == ("**Protocol**: split official · level image + study (max of a study's images) · 32 px (pad) · "
                    "label policy u_ones · 5 labels · evaluated: 234 images, 200 patients, 200 studies")
    assert "| metric | image level (234 images) | CI | study level (200 studies, max) | CI |" in text
    assert "### Study level: 200 studies" in text

    assert main(["evaluate", str(tmp_path / "run"), "--data", f"chexpert:{root}", "--split", "val",
                 "--out", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["study"]["n_studies"] == 200
    assert evaluated["study"]["macro_auc"] == pytest.approx(metrics["study"]["macro_auc"], abs=1e-5)
    assert (tmp_path / "eval" / "report.md").read_text().splitlines()[2].startswith(
        "**Protocol**: split val part of chexpert:")
    md, _ = write_comparison({"a": aggregate([metrics]), "b": aggregate([metrics])}, tmp_path / "cmp")
    table = md.read_text()
    assert table.splitlines()[2].startswith("**Protocol**: split official") and "study/macro_auc" in table
