"""Subgroup evaluation (sex, age band, view): AUCs equal scikit-learn on the subgroup, on the real label files."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxrlab.config import load_recipe
from cxrlab.data.sources import parse_source
from cxrlab.errors import CxrlabError
from cxrlab.metrics.subgroups import age_band_names, format_subgroups, subgroup_column, subgroup_report


@pytest.fixture(scope="module")
def chexpert_valid(shared_data):
    records = parse_source(f"chexpert:{shared_data / 'chexpert' / 'valid.csv'}")
    target = np.nan_to_num(records.values) > 0
    rng = np.random.RandomState(0)
    probs = np.clip(0.35 * target + rng.rand(*target.shape) * 0.8, 0, 1)  # informative, imperfect scores
    return records, target.astype(np.float32), probs


def test_chexpert_valid_gives_sex_age_view(chexpert_valid):
    records, _, _ = chexpert_valid
    meta = records.meta
    assert meta["sex"].value_counts().to_dict() == {"male": 128, "female": 106}
    assert meta["view"].value_counts().to_dict() == {"AP": 169, "PA": 33, "Lateral": 32}
    assert meta["age"].iloc[0] == 73.0  # line 2 of valid.csv: Male,73,Frontal,AP


def test_nih_real_gives_sex_age_view(shared_data):
    meta = parse_source(f"nih:{shared_data / 'nih'}").meta
    first = meta.iloc[0]
    assert (first["sex"], first["age"], first["view"]) == ("male", 57.0, "PA")  # 00000001_000.png,...,57,M,PA
    assert set(meta["sex"]) == {"female", "male"} and len(meta) == 112_120
    assert meta["age"].between(0, 120).all()


def test_subgroup_aucs_equal_sklearn_on_the_subgroup(chexpert_valid):
    records, target, probs = chexpert_valid
    names = list(records.labels.names)
    report = subgroup_report(probs, target, None, names, records.meta, min_positives=5, bootstrap=50, seed=1)
    for attribute in ("sex", "age_band", "view"):
        column = subgroup_column(records.meta, attribute).to_numpy()
        block = report[attribute]
        assert block["labels"], attribute
        for group, g in block["groups"].items():
            rows = column == group
            cols = [names.index(n) for n in block["labels"]]
            expected = np.mean([roc_auc_score(target[rows, j], probs[rows, j]) for j in cols])
            assert g["macro_auc"] == pytest.approx(expected, abs=1e-12)
            lo, hi = g["macro_auc_ci"]
            assert lo <= g["macro_auc"] <= hi  # the CI averages the same labels as the point estimate
            for name, m in g["per_label"].items():
                j = names.index(name)
                assert m["n_positive"] == int(target[rows, j].sum()) >= 5
                assert m["auc"] == pytest.approx(roc_auc_score(target[rows, j], probs[rows, j]), abs=1e-12)
        gaps = {k: v["macro_auc"] for k, v in block["groups"].items()}
        assert block["largest_gap"]["macro_auc_gap"] == pytest.approx(max(gaps.values()) - min(gaps.values()))
    assert set(report["view"]["groups"]) == {"AP", "PA", "Lateral"}


def test_masked_labels_are_left_out_and_bands_follow_the_edges():
    meta = pd.DataFrame({"age": [30, 45, 61, 85, np.nan, 59.5], "sex": ["male", "female", "male", "female",
                                                                         "unknown", "male"]})
    assert subgroup_column(meta, "age_band", [40, 60, 80]).tolist() == ["<40", "40-59", "60-79", ">=80", "unknown",
                                                                        "40-59"]
    assert age_band_names([50]) == ["<50", ">=50"]
    probs = np.array([[0.9], [0.1], [0.8], [0.3], [0.5], [0.2]] * 2)
    target = np.array([[1], [0], [0], [1], [1], [0]] * 2, dtype=float)
    mask = np.ones_like(target)
    mask[2] = 0  # male image 2 (label 0, score 0.8) is unknown: without it the male AUC is perfect
    report = subgroup_report(probs, target, mask, ["A"], pd.concat([meta, meta]), attributes=["sex"],
                             min_positives=1, bootstrap=0)
    male = report["sex"]["groups"]["male"]
    assert male["macro_auc"] == pytest.approx(roc_auc_score([1, 0, 1, 0, 0], [0.9, 0.2, 0.9, 0.8, 0.2]))
    assert report["sex"]["n_unknown"] == 2 and male["macro_auc_ci"] is None


def test_unavailable_attribute_and_misspelt_setting():
    report = subgroup_report(np.zeros((2, 1)), np.array([[0.0], [1.0]]), None, ["A"], pd.DataFrame({"view": ["PA", "AP"]}),
                             bootstrap=0)
    assert "unavailable" in report["sex"] and "unavailable" in report["age_band"]
    assert any("sex: not reported" in line for line in format_subgroups(report))
    with pytest.raises(CxrlabError, match="did you mean 'age_band'"):
        load_recipe("demo", ["eval.subgroups=[age_bands]"])
    with pytest.raises(CxrlabError, match="eval.age_bands"):
        load_recipe("demo", ["eval.age_bands=[60, 40]"])


def test_a_tiny_subgroup_does_not_empty_the_label_set():
    """Six images under 40 without a positive: the other bands still share a label set and get a macro."""
    rng = np.random.RandomState(3)
    n = 206
    age = np.r_[np.full(6, 30.0), rng.uniform(40, 90, n - 6)]
    target = (rng.rand(n, 2) < 0.3).astype(float)
    target[:6] = 0
    probs = np.clip(0.4 * target + rng.rand(n, 2) * 0.7, 0, 1)
    report = subgroup_report(probs, target, None, ["A", "B"], pd.DataFrame({"age": age}), attributes=["age_band"],
                             min_positives=5, bootstrap=0)["age_band"]
    assert report["labels"] == ["A", "B"]
    assert report["groups"]["<40"]["macro_auc"] is None
    band = subgroup_column(pd.DataFrame({"age": age}), "age_band").to_numpy() == "60-79"
    expected = np.mean([roc_auc_score(target[band, j], probs[band, j]) for j in (0, 1)])
    assert report["groups"]["60-79"]["macro_auc"] == pytest.approx(expected)
    assert "–: the subgroup lacks" in "\n".join(format_subgroups({"age_band": report}))
