"""ECE (equal-mass bins) and Brier score against hand computations; their place in metrics.json."""
from __future__ import annotations

import numpy as np
import pytest

from cxrlab.errors import CxrlabError
from cxrlab.metrics import brier_score, expected_calibration_error, multilabel_report, reliability_bins


def test_ece_and_brier_by_hand():
    p = np.array([0.9, 0.1, 0.8, 0.3, 0.6, 0.2])
    y = np.array([1, 0, 0, 1, 1, 0])
    # two equal-mass bins of the sorted predictions: {0.1, 0.2, 0.3} and {0.6, 0.8, 0.9}
    # bin 1: mean p 0.2, observed 1/3; bin 2: mean p 2.3/3, observed 2/3
    by_hand = 0.5 * abs(0.2 - 1 / 3) + 0.5 * abs(2.3 / 3 - 2 / 3)
    assert expected_calibration_error(p, y, bins=2) == pytest.approx(by_hand)
    curve = reliability_bins(p, y, bins=2)
    assert curve["count"].tolist() == [3, 3]
    assert curve["mean_predicted"] == pytest.approx([0.2, 2.3 / 3])
    assert curve["observed"] == pytest.approx([1 / 3, 2 / 3])
    # three bins of two: {0.1, 0.2} obs 0, {0.3, 0.6} obs 1, {0.8, 0.9} obs 1/2
    assert expected_calibration_error(p, y, bins=3) == pytest.approx((0.15 + 0.55 + 0.35) / 3)
    # one bin: |mean p − prevalence|; as many bins as predictions: mean |p − y|
    assert expected_calibration_error(p, y, bins=1) == pytest.approx(abs(p.mean() - y.mean()))
    assert expected_calibration_error(p, y, bins=6) == pytest.approx(np.abs(p - y).mean())
    assert expected_calibration_error(p, y, bins=50) == pytest.approx(np.abs(p - y).mean())
    brier = ((0.1) ** 2 + 0.1 ** 2 + 0.8 ** 2 + 0.7 ** 2 + 0.4 ** 2 + 0.2 ** 2) / 6
    assert brier_score(p, y) == pytest.approx(brier)


def test_unequal_bins_weight_by_size():
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.9])
    y = np.array([0, 0, 1, 1, 1])
    # array_split into 2: {0.1, 0.2, 0.3} and {0.4, 0.9}
    by_hand = 3 / 5 * abs(0.2 - 1 / 3) + 2 / 5 * abs(0.65 - 1.0)
    assert expected_calibration_error(p, y, bins=2) == pytest.approx(by_hand)


def test_calibrated_predictions_have_small_ece_and_overconfident_ones_do_not():
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(float)
    assert expected_calibration_error(p, y, bins=10) < 0.02
    sharp = np.clip(0.5 + 2 * (p - 0.5), 0.001, 0.999)  # overconfident: same ranking, pushed outwards
    assert expected_calibration_error(sharp, y, bins=10) > 0.1
    assert brier_score(sharp, y) > brier_score(p, y)


def test_bad_bins_are_one_line_errors():
    with pytest.raises(CxrlabError, match="bins"):
        expected_calibration_error([0.5], [1], bins=0)
    with pytest.raises(CxrlabError, match="shape mismatch"):
        brier_score([0.5, 0.2], [1])


def test_metrics_json_holds_per_label_and_mean_ece_and_brier():
    rng = np.random.default_rng(1)
    p = rng.random((300, 3))
    y = (rng.random((300, 3)) < p).astype(float)
    mask = np.ones_like(y)
    mask[:100, 2] = 0  # unknown entries are left out of label 2's ECE and Brier
    report = multilabel_report(p, y, mask, ["a", "b", "c"], calibration_bins=15)
    assert report["calibration"] == {"bins": 15, "binning": "equal-mass"}
    known = mask[:, 2] > 0
    assert report["per_label"]["c"]["ece"] == pytest.approx(expected_calibration_error(p[known, 2], y[known, 2], 15))
    assert report["per_label"]["c"]["brier"] == pytest.approx(np.mean((p[known, 2] - y[known, 2]) ** 2))
    eces = [report["per_label"][n]["ece"] for n in "abc"]
    assert report["mean_ece"] == pytest.approx(np.mean(eces))
    assert report["mean_brier"] == pytest.approx(np.mean([report["per_label"][n]["brier"] for n in "abc"]))


def test_reliability_diagram_and_calibration_table_in_the_report(tmp_path):
    from PIL import Image

    from cxrlab.evaluation.plots import plot_reliability
    from cxrlab.evaluation.report import write_report

    rng = np.random.default_rng(2)
    names = [f"finding_{j}" for j in range(7)]
    prevalence = np.linspace(0.05, 0.6, 7)
    y = (rng.random((600, 7)) < prevalence).astype(float)
    p = np.clip(prevalence + 0.3 * (y - prevalence) + 0.1 * rng.normal(size=y.shape), 0, 1)
    p[:, -1] = np.clip(0.5 + 1.6 * (p[:, -1] - 0.5), 0, 1)  # the most prevalent label overconfident
    path = plot_reliability(tmp_path / "rel.png", p, y, None, names)
    with Image.open(path) as img:
        assert img.size[0] > 300 and img.size[1] > 200
    metrics = multilabel_report(p, y, None, names)
    md = write_report(tmp_path / "report", metrics, p, y, np.ones_like(y), names).read_text()
    assert (tmp_path / "report" / "reliability.png").exists() and "reliability.png" in md
    assert "## Calibration" in md and "ECE over 10 equal-mass bins" in md
    assert f"| **mean over labels** | {metrics['mean_ece']:.3f} | {metrics['mean_brier']:.3f} |" in md
    with pytest.raises(CxrlabError, match="shape mismatch"):
        plot_reliability(tmp_path / "bad.png", p[:, :2], y, None, names[:2])
