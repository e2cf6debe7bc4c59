"""Metrics against scikit-learn references, undefined-label handling, bootstrap, thresholds, aggregation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, roc_auc_score, roc_curve

from cxrlab.errors import CxrlabError
from cxrlab.evaluation.tables import aggregate, write_comparison
from cxrlab.metrics import average_precision, binary_auc, macro_auc, multilabel_report
from cxrlab.metrics.multilabel import _AucPlan, bootstrap_aucs
from cxrlab.metrics import fit_thresholds


def _data(n=300, labels=4, seed=0, levels=None):
    """Probabilities correlated with targets; ``levels`` quantises them to force ties."""
    rng = np.random.default_rng(seed)
    t = (rng.random((n, labels)) < 0.3).astype(float)
    p = np.clip(0.35 * t + 0.65 * rng.random((n, labels)), 0, 1)
    if levels:
        p = np.round(p * levels) / levels
    return p, t


@pytest.mark.parametrize("levels", [None, 3, 10, 50])
def test_auc_and_ap_match_sklearn_with_ties(levels):
    rng = np.random.default_rng(levels or 1)
    for _ in range(40):
        n = int(rng.integers(2, 200))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        s = rng.random(n) if levels is None else rng.integers(0, levels + 1, n) / levels
        assert binary_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-10)
        assert average_precision(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-10)


def test_report_matches_sklearn_per_label_and_averages():
    p, t = _data(levels=20)
    thr = np.array([0.3, 0.5, 0.55, 0.7])
    rep = multilabel_report(p, t, label_names=list("abcd"), thresholds=thr)
    pred = p >= thr
    for j, name in enumerate("abcd"):
        m = rep["per_label"][name]
        assert m["auc"] == pytest.approx(roc_auc_score(t[:, j], p[:, j]), abs=1e-10)
        assert m["ap"] == pytest.approx(average_precision_score(t[:, j], p[:, j]), abs=1e-10)
        assert m["f1"] == pytest.approx(f1_score(t[:, j], pred[:, j]), abs=1e-12)
        tn, fp, fn, tp = confusion_matrix(t[:, j], pred[:, j]).ravel()
        assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
        assert m["specificity"] == pytest.approx(tn / (tn + fp))
        expected = (int(t[:, j].sum()), int((1 - t[:, j]).sum()), thr[j])
        assert (m["n_positive"], m["n_negative"], m["threshold"]) == expected
    assert rep["macro_auc"] == pytest.approx(roc_auc_score(t, p, average="macro"), abs=1e-10)
    assert rep["micro_auc"] == pytest.approx(roc_auc_score(t, p, average="micro"), abs=1e-10)
    assert rep["map"] == pytest.approx(average_precision_score(t, p, average="macro"), abs=1e-10)
    assert rep["macro_f1"] == pytest.approx(f1_score(t, pred, average="macro", zero_division=0))
    assert rep["micro_f1"] == pytest.approx(f1_score(t, pred, average="micro", zero_division=0))
    assert rep["macro_f1_at_0.5"] == pytest.approx(f1_score(t, p >= 0.5, average="macro", zero_division=0))
    assert rep["micro_f1_at_0.5"] == pytest.approx(f1_score(t, p >= 0.5, average="micro", zero_division=0))
    assert rep["undefined_labels"] == [] and "macro_auc_ci" not in rep
    assert macro_auc(p, t) == pytest.approx(rep["macro_auc"], abs=1e-12)


def test_mask_excludes_entries_and_undefined_labels_are_null_and_skipped():
    p, t = _data(n=200, labels=3, seed=3)
    mask = np.ones_like(t)
    mask[::3, 0] = 0
    t[mask[:, 0] == 0, 0] = -1                      # uncertain values under the mask are ignored
    mask[:, 2] = (t[:, 2] == 1)                      # label 2: only positives known -> undefined
    rep = multilabel_report(torch.tensor(p), torch.tensor(t), torch.tensor(mask), ["a", "b", "c"])
    k = mask[:, 0] == 1
    assert rep["per_label"]["a"]["auc"] == pytest.approx(roc_auc_score(t[k, 0], p[k, 0]), abs=1e-10)
    assert rep["per_label"]["a"]["n_positive"] + rep["per_label"]["a"]["n_negative"] == int(k.sum())
    c = rep["per_label"]["c"]
    assert rep["undefined_labels"] == ["c"]
    assert c["auc"] is None and c["ap"] is None and c["f1"] is None and c["specificity"] is None
    assert rep["macro_auc"] == pytest.approx((rep["per_label"]["a"]["auc"] + rep["per_label"]["b"]["auc"]) / 2)
    known = mask == 1
    assert rep["micro_auc"] == pytest.approx(roc_auc_score(t[known], p[known]), abs=1e-10)
    json.dumps(rep, allow_nan=False)                 # strictly JSON-able as returned
    assert np.isnan(macro_auc(p[:, 2:], t[:, 2:], mask[:, 2:]))


def test_numpy_and_torch_inputs_agree():
    p, t = _data(seed=5)
    a = multilabel_report(p, t)
    b = multilabel_report(torch.tensor(p, dtype=torch.float64), torch.tensor(t), None)
    assert a == b


@pytest.mark.parametrize("bad, words", [
    (lambda p, t, m: (p[:, :3], t, m), "shape mismatch"),
    (lambda p, t, m: (p * 3 - 1, t, m), "[0, 1]"),
    (lambda p, t, m: (p, t * 2, m), "0 or 1"),
    (lambda p, t, m: (p, np.c_[t[:, :2], t[:, 2:] * 2], m), "label 'c'"),
    (lambda p, t, m: (p, t, m * 0.5), "mask"),
    (lambda p, t, m: (np.where(p > 0.9, np.nan, p), t, m), "NaN"),
])
def test_bad_inputs_raise_named_errors(bad, words):
    p, t = _data()
    with pytest.raises(CxrlabError) as err:
        multilabel_report(*bad(p, t, np.ones_like(t)), label_names=list("abcd"))
    assert words in str(err.value)


def test_bootstrap_equals_sklearn_on_the_same_resamples_and_is_seeded():
    p, t = _data(n=120, labels=3, seed=7, levels=8)
    plans = [_AucPlan(p[:, j], t[:, j]) for j in range(3)]
    fast = bootstrap_aucs(plans, 120, 25, seed=11, chunk_elements=500)   # several chunks
    rng = np.random.default_rng(11)
    for b in range(25):
        idx = rng.integers(0, 120, 120)
        for j in range(3):
            assert fast[b, j] == pytest.approx(roc_auc_score(t[idx, j], p[idx, j]), abs=1e-10)
    assert np.array_equal(fast, bootstrap_aucs(plans, 120, 25, seed=11))
    wide = np.stack([np.bincount(rng.integers(0, 120, 120), minlength=120) for _ in range(4)]).astype(np.int32)
    for j, plan in enumerate(plans):                 # the int32-count path (counts > 127) agrees too
        idx = [np.repeat(np.arange(120), w) for w in wide]
        assert plan.auc(wide) == pytest.approx([roc_auc_score(t[i, j], p[i, j]) for i in idx], abs=1e-10)
    rep = multilabel_report(p, t, bootstrap=50, seed=1)
    assert rep == multilabel_report(p, t, bootstrap=50, seed=1)
    lo, hi = rep["macro_auc_ci"]
    assert lo <= rep["macro_auc"] <= hi
    for m in rep["per_label"].values():
        assert m["auc_ci"][0] <= m["auc"] <= m["auc_ci"][1]


def _brute_f1(s, y, thr):
    pred = s >= thr
    tp, fp, fn = (pred & y).sum(), (pred & ~y).sum(), (~pred & y).sum()
    return 2 * tp / (2 * tp + fp + fn)


def test_f1_threshold_is_the_brute_force_best_and_youden_matches_roc_curve():
    rng = np.random.default_rng(2)
    for trial in range(30):
        n = int(rng.integers(5, 60))
        y = rng.integers(0, 2, n).astype(bool)
        if y.all() or not y.any():
            continue
        s = rng.integers(0, 12, n) / 11 if trial % 2 else rng.random(n)
        thr_f1, thr_j = fit_thresholds(s, y, method="f1")[0], fit_thresholds(s, y, method="youden")[0]
        assert _brute_f1(s, y, thr_f1) == pytest.approx(max(_brute_f1(s, y, c) for c in np.unique(s)))
        fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
        best = int(np.argmax(tpr - fpr))
        if np.isfinite(thr[best]):
            assert thr_j == thr[best]


def test_thresholds_undefined_labels_mask_and_method_name():
    p, t = _data(n=50, labels=2)
    t[:, 1] = 0
    mask = np.ones_like(t)
    out = fit_thresholds(p, t, mask, method="youden")
    assert out.shape == (2,) and out[1] == 0.5
    with pytest.raises(CxrlabError, match="did you mean 'youden'"):
        fit_thresholds(p, t, method="youdn")


def test_aggregate_mean_std_nan_aware_and_comparison(tmp_path):
    def rep(auc_a, auc_b, macro):
        return {"macro_auc": macro, "map": 0.5, "macro_f1": None, "undefined_labels": [], "split_sizes": {"x": 1},
                "per_label": {"a": {"auc": auc_a, "auc_ci": [0, 1]}, "b": {"auc": auc_b}}}
    agg = aggregate([rep(0.8, None, 0.7), rep(0.9, 0.6, 0.8), rep(0.7, 0.7, 0.9)])
    assert agg["macro_auc"]["mean"] == pytest.approx(0.8)
    assert agg["macro_auc"]["std"] == pytest.approx(np.std([0.7, 0.8, 0.9], ddof=1))
    std_b = np.std([0.6, 0.7], ddof=1)
    assert agg["per_label"]["b"]["auc"] == {"mean": pytest.approx(0.65), "std": pytest.approx(std_b), "n": 2}
    assert agg["per_label"]["b"]["n_defined"] == 2 and agg["per_label"]["a"]["n_defined"] == 3
    assert "split_sizes" not in agg and "auc_ci" not in agg["per_label"]["a"] and agg["n_reports"] == 3
    assert agg["macro_f1"]["n"] == 0 and np.isnan(agg["macro_f1"]["mean"])
    single = aggregate([rep(0.8, 0.6, 0.7)])
    md, js = write_comparison({"base": agg, "one": single}, tmp_path)
    table = json.loads(js.read_text())
    assert table["base"]["macro_auc"]["n"] == 3 and table["one"]["macro_auc"]["std"] is None
    assert table["base"]["auc/b"]["n"] == 2
    text = md.read_text()
    assert "0.8000 ± 0.1000" in text and "| a |" in text and "(n=1)" in text


def test_macro_ci_is_over_a_fixed_label_set_and_holds_its_point_estimate():
    """Issue 24's reproduction: three labels with ~80 positives and one with a single positive. The
    single-positive label lacks its positive in ~37 % of resamples; averaging the other three there
    (whose AUC is higher) dragged the interval above the point estimate (was macro 0.618, CI [0.593, 0.803])."""
    rng = np.random.default_rng(0)
    n = 400
    y = (rng.random((n, 4)) < [0.2, 0.2, 0.2, 0.0]).astype(float)
    y[0, 3] = 1.0  # the single positive
    p = np.clip(0.25 * y + 0.75 * rng.random((n, 4)), 0, 1)
    p[0, 3] = 0.02  # ranked below nearly every negative: AUC near 0, far from the other three
    report = multilabel_report(p, y, bootstrap=500, seed=0)
    lo, hi = report["macro_auc_ci"]
    assert report["per_label"]["label_3"]["n_positive"] == 1
    assert lo <= report["macro_auc"] <= hi
    # the rule: a resample lacking the positive keeps label_3's full-set AUC; by hand for that case
    from cxrlab.metrics import bootstrap_auc_ci
    from cxrlab.metrics.multilabel import fixed_label_macro
    plans = [_AucPlan(p[:, j], y[:, j]) for j in range(4)]
    boot = bootstrap_aucs(plans, n, 500, 0)
    lacking = ~np.isfinite(boot[:, 3])
    assert 0.25 < lacking.mean() < 0.5
    full = np.array([pl.auc()[0] for pl in plans])
    macro = fixed_label_macro(boot, full)
    assert macro[lacking] == pytest.approx(boot[lacking, :3].sum(1) / 4 + full[3] / 4)
    assert [lo, hi] == pytest.approx(list(np.percentile(macro, [2.5, 97.5])))
    # the old rule (drop the label from such resamples) puts the point estimate outside its interval
    dropped = np.nanmean(boot, axis=1)
    assert np.percentile(dropped, 97.5) - report["macro_auc"] > 3 * (hi - report["macro_auc"])
    assert bootstrap_auc_ci(p, y, resamples=500, seed=0)[0] == pytest.approx([lo, hi])
