"""The embedded synthetic radiographs: NIH label statistics, determinism, patients, and that every
finding is drawn where a radiologist would look for it."""
from __future__ import annotations

import numpy as np
import pytest

from cxrlab.data import synthetic
from cxrlab.data.synthetic import generate, load_synthetic, parse_spec, render, sample_labels, sample_patients
from cxrlab.errors import CxrlabError
from cxrlab.labels import NIH14

# Image counts per label in the NIH label file (shared/data/README.md), out of 112,120 images.
NIH_COUNTS = {"Infiltration": 19894, "Effusion": 13317, "Atelectasis": 11559, "Nodule": 6331, "Mass": 5782,
              "Pneumothorax": 5302, "Consolidation": 4667, "Pleural_Thickening": 3385, "Cardiomegaly": 2776,
              "Emphysema": 2516, "Edema": 2303, "Fibrosis": 1686, "Pneumonia": 1431, "Hernia": 227}
NIH_IMAGES, NIH_NO_FINDING = 112120, 60361


@pytest.fixture(scope="module")
def draws() -> np.ndarray:
    return sample_labels(20000, seed=7)


def test_embedded_table_is_the_nih_file():
    sets, counts = synthetic.combo_table()
    assert counts.sum() == NIH_IMAGES
    assert counts[~sets.any(1)].sum() == NIH_NO_FINDING
    for name, count in NIH_COUNTS.items():
        assert counts[sets[:, NIH14.index(name)]].sum() == count, name


def test_label_frequencies_match_nih(draws):
    n = len(draws)
    for name, count in NIH_COUNTS.items():
        p = count / NIH_IMAGES
        tolerance = 4 * np.sqrt(p * (1 - p) / n) + 1e-3
        assert abs(draws[:, NIH14.index(name)].mean() - p) < tolerance, name
    assert abs((draws.sum(1) == 0).mean() - NIH_NO_FINDING / NIH_IMAGES) < 0.015


def test_cooccurrence_follows_nih(draws):
    def p(label, given=None):
        rows = draws[:, NIH14.index(given)] == 1 if given else slice(None)
        return draws[rows, NIH14.index(label)].mean()

    assert p("Effusion", given="Atelectasis") > 1.5 * p("Effusion")
    assert p("Consolidation", given="Pneumonia") > 1.5 * p("Consolidation")
    assert p("Edema", given="Infiltration") > p("Edema")
    assert (draws.sum(1) >= 2).mean() > 0.1          # many images have several findings, as in NIH


def test_temperature_flattens_towards_rare_labels():
    faithful, flat = sample_labels(20000, seed=1), sample_labels(20000, seed=1, temperature=3)
    hernia = NIH14.index("Hernia")
    assert flat[:, hernia].mean() > 3 * faithful[:, hernia].mean()
    assert (flat.sum(1) == 0).mean() < (faithful.sum(1) == 0).mean()


def test_images_depend_only_on_seed_and_index():
    small, records_small = generate(6, size=32, seed=3)
    large, records_large = generate(9, size=32, seed=3)
    np.testing.assert_array_equal(small, large[:6])
    np.testing.assert_array_equal(records_small.values, records_large.values[:6])
    pd_equal = records_small.meta.equals(records_large.meta.iloc[:6].reset_index(drop=True))
    assert pd_equal
    subset = records_large.take([8, 2])                          # any subset, rendered independently
    np.testing.assert_array_equal(subset.read(0), large[8])
    np.testing.assert_array_equal(subset.read(1), large[2])
    other, _ = generate(6, size=32, seed=4)
    assert not np.allclose(other, small)
    assert small.dtype == np.float32 and small.min() >= 0 and small.max() <= 1


def test_patients_views_and_paths():
    records = load_synthetic("3000,seed=2")
    meta = records.meta
    per_patient = meta.groupby("patient_id").size()
    assert 3.0 < per_patient.mean() < 4.5 and per_patient.max() > 5
    assert meta["study_id"].is_unique
    assert meta["path"].iloc[5] == "synthetic://2/5"
    assert 0.33 < (meta["view"] == "AP").mean() < 0.47 and set(meta["view"]) == {"AP", "PA"}
    patient, _ = sample_patients(3000, seed=2)
    assert (np.diff(patient) >= 0).all()                         # a patient's images are consecutive


def test_images_of_one_patient_share_anatomy():
    none = np.zeros(len(NIH14))

    def distance(i, j, p, q):
        return np.abs(render(i, none, 0, 48, patient=p) - render(j, none, 0, 48, patient=q)).mean()

    same = np.mean([distance(2 * k, 2 * k + 1, k, k) for k in range(30)])
    other = np.mean([distance(2 * k, 2 * k + 1, k, k + 1000) for k in range(30)])
    assert same < other


# Where each finding must show in the mean difference image (finding drawn − same chest without it),
# as (region, sign) in coordinates x, y ∈ [-1, 1] (y down; image right = patient left).
LUNGS = "lungs"
REGIONS = {
    "Atelectasis": ("lower lungs", +1),
    "Cardiomegaly": ("heart borders", +1),
    "Effusion": ("lung bases", +1),
    "Infiltration": (LUNGS, +1),
    "Mass": (LUNGS, +1),
    "Nodule": (LUNGS, +1),
    "Pneumonia": ("lower lungs", +1),
    "Pneumothorax": ("upper lateral lungs", -1),
    "Consolidation": (LUNGS, +1),
    "Edema": ("perihilar", +1),
    "Emphysema": (LUNGS, -1),
    "Fibrosis": ("lower lungs", +1),
    "Pleural_Thickening": ("lateral lung rims", +1),
    "Hernia": ("retrocardiac", -1),
}


def _region(name: str, size: int) -> np.ndarray:
    t = (np.arange(size) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(t, t)
    ax = np.abs(x)
    lungs = (ax > 0.2) & (ax < 0.65) & (y > -0.5) & (y < 0.35)
    return {
        LUNGS: lungs,
        "lower lungs": lungs & (y > 0.0),
        "lung bases": (ax > 0.2) & (ax < 0.7) & (y > 0.1) & (y < 0.45),
        "upper lateral lungs": (ax > 0.35) & (ax < 0.7) & (y > -0.6) & (y < 0.0),
        "heart borders": (x > -0.45) & (x < 0.55) & (y > -0.05) & (y < 0.45),
        "perihilar": (ax > 0.1) & (ax < 0.45) & (y > -0.3) & (y < 0.25),
        "lateral lung rims": (ax > 0.5) & (ax < 0.72) & (y > -0.4) & (y < 0.35),
        "retrocardiac": (ax < 0.25) & (y > 0.05) & (y < 0.45),
    }[name]


@pytest.mark.parametrize("label", NIH14.names)
def test_each_finding_shows_in_its_region(label):
    size, n = 48, 24
    on = np.zeros(len(NIH14))
    on[NIH14.index(label)] = 1
    diff = np.mean([render(i, on, 5, size) - render(i, np.zeros(len(NIH14)), 5, size) for i in range(n)], 0)
    region_name, sign = REGIONS[label]
    region = _region(region_name, size)
    inside = sign * diff[region].mean()
    outside = np.abs(diff[~region]).mean()
    assert inside > 0.002, (label, inside)
    assert inside > outside, (label, inside, outside)


def test_spec_grammar_and_errors():
    assert parse_spec("3000") == {"n": 3000, "seed": 0, "size": 64, "temperature": 1.0}
    assert parse_spec("")["n"] == parse_spec(",seed=1")["n"] == synthetic.DEFAULT_N
    assert parse_spec("10, seed=2,temperature=1.5,size=32") == {"n": 10, "seed": 2, "size": 32, "temperature": 1.5}
    records = load_synthetic("10,seed=2,size=32")
    assert records.labels == NIH14 and records.read(0).shape == (32, 32)
    for bad, words in [("abc", "integer"), ("10,sed=1", "did you mean 'seed'"),
                       ("10,seed", "bad option"), ("0", "at least 1"), ("10,seed=-1", "seed"),
                       ("10,temperature=0", "temperature")]:
        with pytest.raises(CxrlabError, match=words):
            parse_spec(bad)


def test_parse_source_delegates_and_filters_views():
    from cxrlab.data.sources import parse_source

    records = parse_source("synthetic:200,seed=1", views="AP")
    assert len(records) > 0 and set(records.meta["view"]) == {"AP"}
    first = records.meta["path"].iloc[0]
    i = int(first.rsplit("/", 1)[1])
    np.testing.assert_array_equal(records.read(0), load_synthetic("200,seed=1").read(i))


def test_global_findings_are_learnable_but_not_trivially():
    """A linear model on raw 32-px pixels (no CNN) already separates the large-scale findings, but
    not perfectly: noise, anatomy, faint findings and overlapping labels remain."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    images, records = generate(2000, size=32, seed=11, temperature=2)
    x, y = images.reshape(len(images), -1), records.values
    for name in ("Effusion", "Emphysema", "Cardiomegaly", "Edema"):
        j = NIH14.index(name)
        model = LogisticRegression(C=0.05, max_iter=500).fit(x[:1400], y[:1400, j])
        auc = roc_auc_score(y[1400:, j], model.decision_function(x[1400:]))
        assert 0.75 < auc < 0.99, (name, auc)
