"""DeLong's test (Sun & Xu's fast algorithm) and the paired bootstrap of macro AUC / mAP differences."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cxrlab.errors import CxrlabError
from cxrlab.metrics.multilabel import average_precision
from cxrlab.metrics.significance import _ApPlan, _midranks, delong_test, paired_bootstrap


def slow_delong(a: np.ndarray, b: np.ndarray, y: np.ndarray):
    """DeLong et al. (1988) as written: every positive against every negative, O(m·n).
    Returns (auc_a, auc_b, variance of auc_a − auc_b)."""
    def psi(x, z):
        return 1.0 if x > z else 0.5 if x == z else 0.0

    comps = []
    for s in (a, b):
        pos, neg = s[y], s[~y]
        kernel = np.array([[psi(x, z) for z in neg] for x in pos])
        comps.append((kernel.mean(), kernel.mean(1), kernel.mean(0)))
    m, n = y.sum(), (~y).sum()
    s10 = np.cov(np.stack([comps[0][1], comps[1][1]]))  # 2×2, ddof=1
    s01 = np.cov(np.stack([comps[0][2], comps[1][2]]))
    s = s10 / m + s01 / n
    return comps[0][0], comps[1][0], s[0, 0] + s[1, 1] - 2 * s[0, 1]


def test_midranks():
    assert _midranks(np.array([0.3, 0.1, 0.3, 0.2, 0.3])).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]


def test_delong_hand_computed_case():
    # A: positives 0.9, 0.6; negatives 0.7, 0.2, 0.1 -> V10 = (1, 2/3), V01 = (1/2, 1, 1), AUC 5/6
    # B: positives 0.8, 0.3; negatives 0.3, 0.5, 0.1 (a tie) -> V10 = (1, 1/2), V01 = (3/4, 1/2, 1), AUC 3/4
    # differences of centred components: positives (-1/12, 1/12), negatives (-1/3, 5/12, -1/12)
    # var = (2/144)/(1·2) + (42/144)/(2·3) = 1/144 + 7/144 = 1/18; z = (1/12)/sqrt(1/18) = sqrt(18)/12
    y = np.array([1, 0, 1, 0, 0])  # rows interleaved, so the row bookkeeping is exercised too
    a = np.array([0.9, 0.7, 0.6, 0.2, 0.1])
    b = np.array([0.8, 0.3, 0.3, 0.5, 0.1])
    out = delong_test(a, b, y)["per_label"]["label_0"]
    assert out["auc_a"] == pytest.approx(5 / 6) and out["auc_b"] == pytest.approx(3 / 4)
    assert out["difference"] == pytest.approx(1 / 12)
    assert out["se"] == pytest.approx(math.sqrt(1 / 18))
    assert out["z"] == pytest.approx(math.sqrt(18) / 12)
    assert out["p"] == pytest.approx(math.erfc(math.sqrt(18) / 12 / math.sqrt(2)))
    assert out["p"] == pytest.approx(0.7237, abs=1e-4)
    assert (out["n_positive"], out["n_negative"]) == (2, 3)


def test_delong_matches_the_slow_reference_with_ties_and_mask():
    rng = np.random.default_rng(0)
    n, labels = 300, 3
    y = rng.random((n, labels)) < [0.3, 0.1, 0.5]
    a = np.round(np.clip(0.3 * y + rng.random((n, labels)) * 0.7, 0, 1), 2)  # rounding makes ties
    b = np.round(np.clip(0.2 * y + rng.random((n, labels)) * 0.8, 0, 1), 2)
    mask = (rng.random((n, labels)) > 0.2).astype(float)
    out = delong_test(a, b, y, mask, label_names=["x", "y", "z"])
    for j, name in enumerate("xyz"):
        k = mask[:, j] > 0
        auc_a, auc_b, var = slow_delong(a[k, j], b[k, j], y[k, j])
        got = out["per_label"][name]
        assert got["auc_a"] == pytest.approx(auc_a, abs=1e-12) and got["auc_b"] == pytest.approx(auc_b, abs=1e-12)
        assert got["se"] ** 2 == pytest.approx(var, rel=1e-10)
    assert out["macro"]["labels"] == ["x", "y", "z"]
    assert out["macro"]["difference"] == pytest.approx(np.mean([out["per_label"][c]["difference"] for c in "xyz"]))


def test_delong_macro_uses_the_covariance_between_labels():
    rng = np.random.default_rng(1)
    y = rng.random(400) < 0.3
    a, b = (0.4 * y + rng.random(400)) / 1.4, (0.2 * y + rng.random(400)) / 1.2
    single = delong_test(a, b, y)
    # one label: the macro is that label
    assert single["macro"]["se"] == pytest.approx(single["per_label"]["label_0"]["se"])
    # the same label twice is perfectly correlated: the macro SE must not shrink by sqrt(2)
    twice = delong_test(np.c_[a, a], np.c_[b, b], np.c_[y, y])
    assert twice["macro"]["se"] == pytest.approx(single["macro"]["se"])
    assert twice["macro"]["p"] == pytest.approx(single["macro"]["p"])
    # two independent labels: variance of the mean = mean of the variances / 2 (covariance near zero)
    y2 = rng.random(400) < 0.3
    a2, b2 = (0.4 * y2 + rng.random(400)) / 1.4, (0.2 * y2 + rng.random(400)) / 1.2
    both = delong_test(np.c_[a, a2], np.c_[b, b2], np.c_[y, y2])
    se1, se2 = (both["per_label"][f"label_{j}"]["se"] for j in (0, 1))
    assert both["macro"]["se"] ** 2 == pytest.approx((se1 ** 2 + se2 ** 2) / 4, rel=0.15)


def test_delong_macro_se_agrees_with_the_bootstrap_and_clusters_absorb_repeats():
    rng = np.random.default_rng(2)
    n = 1500
    y = rng.random((n, 3)) < [0.2, 0.3, 0.4]
    shared = rng.normal(size=(n, 1))  # both predictors and all labels share image-level noise
    a = 1 / (1 + np.exp(-(1.2 * y + shared + rng.normal(size=(n, 3)))))
    b = 1 / (1 + np.exp(-(0.9 * y + shared + rng.normal(size=(n, 3)))))
    dl = delong_test(a, b, y)["macro"]
    boot = paired_bootstrap(a, b, y, resamples=400, seed=0)
    lo, hi = boot["macro_auc"]["ci"]
    assert boot["macro_auc"]["difference"] == pytest.approx(dl["difference"])
    assert (hi - lo) / (2 * 1.96) == pytest.approx(dl["se"], rel=0.2)
    assert dl["p"] < 0.05 and boot["macro_auc"]["p"] < 0.05
    # every image scored twice (two runs): as independent rows the SE shrinks by about sqrt(2);
    # as clusters of one image it stays where it was
    a2, b2, y2 = np.r_[a, a], np.r_[b, b], np.r_[y, y]
    ids = np.r_[np.arange(n), np.arange(n)]
    naive = delong_test(a2, b2, y2)["macro"]["se"]
    clustered = delong_test(a2, b2, y2, clusters=ids)["macro"]["se"]
    assert naive == pytest.approx(dl["se"] / math.sqrt(2), rel=0.02)
    assert clustered == pytest.approx(dl["se"], rel=0.02)
    wide = paired_bootstrap(a2, b2, y2, clusters=ids, resamples=400, seed=0)
    assert wide["n_clusters"] == n
    assert wide["macro_auc"]["ci"][1] - wide["macro_auc"]["ci"][0] == pytest.approx(hi - lo, rel=0.2)


def test_identical_predictors_have_no_difference():
    rng = np.random.default_rng(3)
    y = rng.random((200, 4)) < 0.3
    p = rng.random((200, 4))
    boot = paired_bootstrap(p, p.copy(), y, resamples=200, seed=1)
    for key in ("macro_auc", "map"):
        assert boot[key]["difference"] == 0.0 and boot[key]["ci"] == [0.0, 0.0] and boot[key]["p"] == 1.0
    dl = delong_test(p, p, y)
    assert dl["macro"]["difference"] == 0.0 and dl["macro"]["p"] == 1.0
    assert all(v["p"] == 1.0 for v in dl["per_label"].values())


def test_a_clearly_better_predictor_gets_a_small_p():
    rng = np.random.default_rng(4)
    y = rng.random((300, 3)) < 0.3
    good = np.clip(0.5 * y + 0.5 * rng.random((300, 3)), 0, 1)
    noise = rng.random((300, 3))
    boot = paired_bootstrap(good, noise, y, resamples=300, seed=0)
    for key in ("macro_auc", "map"):
        assert boot[key]["difference"] > 0.2 and boot[key]["ci"][0] > 0 and boot[key]["p"] < 0.01
    # the reverse order gives the opposite sign and the same verdict
    back = paired_bootstrap(noise, good, y, resamples=300, seed=0)
    assert back["macro_auc"]["difference"] == pytest.approx(-boot["macro_auc"]["difference"])
    assert back["macro_auc"]["p"] < 0.01
    assert delong_test(good, noise, y)["macro"]["p"] < 1e-6
    # a small real difference on few images is not significant
    slight = np.clip(good + 0.3 * rng.random((300, 3)), 0, 1)
    assert paired_bootstrap(good[:40], slight[:40], y[:40], resamples=300, seed=0)["macro_auc"]["p"] > 0.05


def test_weighted_ap_equals_ap_on_repeated_rows():
    rng = np.random.default_rng(5)
    scores = np.round(rng.random(50), 1)  # ties
    labels = rng.random(50) < 0.4
    plan = _ApPlan(scores, labels, np.arange(50))
    counts = rng.integers(0, 3, (4, 50))
    got = plan.ap(np.r_[np.ones((1, 50), int), counts])
    assert got[0] == pytest.approx(average_precision(scores, labels))
    for k in range(4):
        expanded = np.repeat(np.arange(50), counts[k])
        assert got[k + 1] == pytest.approx(average_precision(scores[expanded], labels[expanded]), rel=1e-6)


def test_bad_input_is_named():
    y = np.array([[1, 0], [0, 1], [1, 1]])
    with pytest.raises(CxrlabError, match=r"probabilities \(3, 1\) vs targets \(3, 2\)"):
        delong_test(np.ones((3, 2)) / 2, np.ones((3, 1)) / 2, y)
    with pytest.raises(CxrlabError, match="one id per row"):
        paired_bootstrap(np.ones((3, 2)) / 2, np.ones((3, 2)) / 2, y, clusters=[1, 2])
    with pytest.raises(CxrlabError, match=r"\[0, 1\]"):
        delong_test(np.full((3, 2), 2.0), np.ones((3, 2)) / 2, y)
