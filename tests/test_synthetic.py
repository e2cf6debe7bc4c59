"""The embedded synthetic radiographs: NIH label statistics, determinism, patients, and that every
finding is drawn where a radiologist would look for it."""
from __future__ import annotations

import numpy as np
import pytest

from cxrlab.data import synthetic
from cxrlab.data.synthetic import generate, load_synthetic, parse_spec, render, sample_labels, sample_patients
from cxrlab.errors import CxrlabError
from cxrlab.labels import CHEXPERT14, NIH14

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
    assert parse_spec("3000") == {"n": 3000, "seed": 0, "size": 64, "temperature": 1.0, "labels": "nih14"}
    assert parse_spec("")["n"] == parse_spec(",seed=1")["n"] == synthetic.DEFAULT_N
    assert parse_spec("10, seed=2,temperature=1.5,size=32") == {"n": 10, "seed": 2, "size": 32, "temperature": 1.5,
                                                                "labels": "nih14"}
    assert parse_spec("10,labels=chexpert14")["labels"] == "chexpert14"
    records = load_synthetic("10,seed=2,size=32")
    assert records.labels == NIH14 and records.read(0).shape == (32, 32)
    assert load_synthetic("10,size=32,labels=chexpert14").labels == CHEXPERT14
    for bad, words in [("abc", "integer"), ("10,sed=1", "did you mean 'seed'"),
                       ("10,seed", "bad option"), ("0", "at least 1"), ("10,seed=-1", "seed"),
                       ("10,temperature=0", "temperature"), ("10,labels=chexpert", "did you mean 'chexpert14'"),
                       ("10,label=nih14", "did you mean 'labels'")]:
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


# ------------------------------------------------------------------ CheXpert-like labels (labels=chexpert14)

@pytest.fixture(scope="module")
def chexpert_draws() -> np.ndarray:
    return sample_labels(20000, seed=7, labels="chexpert14")


def test_chexpert_table_is_the_frequent_combinations_of_the_file(shared_data):
    """The embedded table is exactly CheXpert's frontal label sets (U-Zeros) seen at least 5 times."""
    import pandas as pd

    df = pd.read_csv(shared_data / "chexpert" / "chexpert_train.csv.gz")
    frontal = df[df["Frontal/Lateral"] == "Frontal"]
    values = (frontal[list(CHEXPERT14.names)].to_numpy() == 1).astype(np.int64)   # -1 and blank -> 0
    assert len(values) == synthetic.CHEXPERT_FRONTAL_IMAGES
    assert tuple(values.sum(0)) == synthetic.CHEXPERT_FRONTAL_COUNTS
    masks = pd.Series((values << np.arange(14)).sum(1)).value_counts()
    frequent = masks[masks >= 5]
    sets, counts = synthetic.combo_table("chexpert14")
    table = dict(zip((sets.astype(np.int64) << np.arange(14)).sum(1).tolist(), counts.tolist()))
    assert table == frequent.to_dict()


def test_chexpert_table_keeps_the_label_frequencies():
    """Dropping the rare combinations changes no label's frequency by more than 15 % (relative)."""
    full = np.array(synthetic.CHEXPERT_FRONTAL_COUNTS) / synthetic.CHEXPERT_FRONTAL_IMAGES
    kept = synthetic.prevalence("chexpert14")
    assert np.all(np.abs(kept - full) / full < 0.15), dict(zip(CHEXPERT14.names, kept / full))
    assert abs(kept[CHEXPERT14.index("Support Devices")] - 0.561) < 0.005   # CheXpert's most frequent


def test_chexpert_label_frequencies_and_density(chexpert_draws):
    n = len(chexpert_draws)
    for j, p in enumerate(synthetic.prevalence("chexpert14")):
        assert abs(chexpert_draws[:, j].mean() - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-3, CHEXPERT14.names[j]
    per_image = chexpert_draws.sum(1)
    assert 2.2 < per_image.mean() < 2.6 and (per_image >= 2).mean() > 0.7   # NIH: 0.72 and 19 %
    nf = CHEXPERT14.index("No Finding")
    others = np.delete(chexpert_draws, [nf, CHEXPERT14.index("Support Devices")], axis=1)
    assert not (chexpert_draws[:, nf].astype(bool) & others.any(1)).any()   # No Finding: no pathology


def test_spml_hides_far_more_positives_with_chexpert_labels():
    """The share of unknown training entries that are truly positive under `spml`: 11.0 % with the
    CheXpert-like labels (13 unknown labels per image) against 1.9 % with NIH's (14 + "No Finding")."""
    from cxrlab.data.policies import apply_policy

    def hidden_share(labels: str) -> float:
        records = load_synthetic(f"20000,seed=3,size=16,labels={labels}")
        result = apply_policy(records.values, records.labels, "spml", seed=0)
        unknown = result.mask == 0
        return float((result.full_target[unknown] == 1).mean())

    assert abs(hidden_share("chexpert14") - 0.110) < 0.006
    assert abs(hidden_share("nih14") - 0.0187) < 0.003


def test_chexpert_sets_are_deterministic_and_nested():
    small, rec_small = generate(5, size=32, seed=2, labels="chexpert14")
    large, rec_large = generate(8, size=32, seed=2, labels="chexpert14")
    np.testing.assert_array_equal(small, large[:5])
    np.testing.assert_array_equal(rec_small.values, rec_large.values[:5])
    again, _ = generate(5, size=32, seed=2, labels="chexpert14")
    np.testing.assert_array_equal(small, again)
    assert rec_large.labels == CHEXPERT14
    # CheXpert's films are mostly AP (84 % of frontal images), NIH's mostly PA
    views = load_synthetic("4000,seed=1,size=16,labels=chexpert14").meta["view"]
    assert 0.8 < (views == "AP").mean() < 0.88


CHEXPERT_REGIONS = {
    "Enlarged Cardiomediastinum": "mediastinum", "Lung Opacity": LUNGS, "Lung Lesion": LUNGS,
    "Pleural Other": "pleura", "Fracture": "chest wall", "Support Devices": "upper chest",
}


def _chexpert_region(name: str, size: int) -> np.ndarray:
    if name in (LUNGS,):
        return _region(name, size)
    t = (np.arange(size) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(t, t)
    ax = np.abs(x)
    return {
        "mediastinum": (ax < 0.3) & (y < 0.2),
        "pleura": ((ax > 0.5) & (ax < 0.8) & (y > -0.6) & (y < 0.35)) | ((ax > 0.15) & (ax < 0.75) & (y > 0.1) & (y < 0.5)),
        "chest wall": (ax > 0.45) & (ax < 0.85) & (y > -0.7) & (y < 0.4),
        "upper chest": (ax < 0.75) & (y < 0.25),
    }[name]


@pytest.mark.parametrize("label", sorted(CHEXPERT_REGIONS))
def test_each_new_chexpert_finding_shows_in_its_region(label):
    size, n = 48, 24
    on = np.zeros(len(CHEXPERT14))
    on[CHEXPERT14.index(label)] = 1
    off = np.zeros(len(CHEXPERT14))
    diff = np.mean([render(i, on, 5, size, label_set="chexpert14") - render(i, off, 5, size, label_set="chexpert14")
                    for i in range(n)], 0)
    region = _chexpert_region(CHEXPERT_REGIONS[label], size)
    inside, outside = diff[region].mean(), np.abs(diff[~region]).mean()
    assert inside > 0.0005, (label, inside)   # a rib callus is small: a few pixels at 48 px
    assert inside > 2 * outside, (label, inside, outside)


def test_new_chexpert_findings_are_learnable_but_not_trivially():
    """A linear model on raw 32-px pixels detects the large new findings well above chance, but far
    from perfectly (measured: Enlarged Cardiomediastinum 0.92, Support Devices 0.82 on 2,000 images)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    images, records = generate(1200, size=32, seed=11, temperature=2, labels="chexpert14")
    x, y = images.reshape(len(images), -1), records.values
    for name in ("Enlarged Cardiomediastinum", "Support Devices"):
        j = CHEXPERT14.index(name)
        model = LogisticRegression(C=0.05, max_iter=300).fit(x[:900], y[:900, j])
        auc = roc_auc_score(y[900:, j], model.decision_function(x[900:]))
        assert 0.7 < auc < 0.98, (name, auc)
