"""calibrate: temperature scaling recovers a known temperature, thresholds are refitted on the local set
(equal to fit_thresholds on independently computed predictions), and the copy records their source."""
from __future__ import annotations

import json

import numpy as np
import pytest
from test_export import LABELS, one_thread, tiny_checkpoint  # noqa: F401 (autouse)

from cxrlab.errors import CxrlabError


def test_fit_temperature_recovers_the_generating_one():
    from cxrlab.inference.calibrate import fit_temperature

    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 40_000)
    for true in (0.5, 1.0, 2.5):
        y = rng.random(z.size) < 1 / (1 + np.exp(-z / true))
        assert fit_temperature(z, y) == pytest.approx(true, rel=0.05)
    assert fit_temperature(z[:10], np.ones(10)) == 1.0  # one class only: no information
    inverse = rng.random(z.size) < 1 / (1 + np.exp(z))  # scores anti-correlated with the labels
    assert fit_temperature(z, inverse) == pytest.approx(20.0)  # flattened as far as the bounds allow


def test_fit_temperature_is_the_bce_minimum():
    from cxrlab.inference.calibrate import fit_temperature

    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, 500)
    y = rng.random(500) < 1 / (1 + np.exp(-z / 1.7))

    def bce(t):
        p = np.clip(1 / (1 + np.exp(-z / t)), 1e-12, 1 - 1e-12)
        return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))

    best = fit_temperature(z, y)
    grid = np.linspace(0.2, 20, 4000)
    assert bce(best) <= min(bce(t) for t in grid) + 1e-9


@pytest.mark.parametrize("temperature", [False, True])
def test_calibrate_refits_and_records(tmp_path, temperature):
    from cxrlab.checkpoint import read_info
    from cxrlab.data.policies import apply_policy
    from cxrlab.data.sources import parse_source
    from cxrlab.inference.calibrate import calibrate, scaled_thresholds
    from cxrlab.inference.predictor import Predictor
    from cxrlab.labels import LabelSpace
    from cxrlab.metrics import fit_thresholds

    ckpt = tiny_checkpoint(tmp_path / "ckpt", "linear", size=32, thresholds=(0.3, 0.5, 0.6))
    before = (ckpt / "checkpoint.json").read_text()
    source = "synthetic:96,size=32,seed=3"
    record = calibrate(ckpt, source, tmp_path / "site", temperature=temperature)
    assert (ckpt / "checkpoint.json").read_text() == before  # the original is untouched
    assert record["n"] == 96 and record["source"] == source and record["date"].startswith("20")
    info = read_info(tmp_path / "site")
    assert source in info["threshold_source"] and "cxrlab calibrate" in info["threshold_source"]
    assert info["calibration"] == record
    # independently: predictions on the same images, the same threshold rule
    records = parse_source(source)
    cols = [records.labels.names.index(n) for n in LABELS]
    result = apply_policy(records.values[:, cols], LabelSpace("t", LABELS), "full")
    images = [records.read(int(row)) for row in result.rows]
    probs = Predictor.from_checkpoint(ckpt, device="cpu").predict(images).astype(np.float64)
    if temperature:
        t = np.asarray(info["temperature"])
        assert t.shape == (3,) and (t > 0).all() and not np.allclose(t, 1.0)
        logits = np.log(probs) - np.log1p(-probs)
        probs = 1 / (1 + np.exp(-logits / t))
    else:
        assert info["temperature"] is None
    expected = fit_thresholds(probs, result.target, result.mask)  # on the (scaled) probabilities
    stored = np.asarray(info["thresholds"])
    if temperature:  # stored on the unscaled scale, so predict (no temperature) decides the same
        stored = scaled_thresholds(stored, info["temperature"])
    for j, name in enumerate(LABELS):
        if name in record["labels_refitted"]:
            assert stored[j] == pytest.approx(expected[j], abs=1e-6)
        else:
            assert stored[j] == pytest.approx([0.3, 0.5, 0.6][j])
    assert record["labels_refitted"]  # the synthetic set has both classes for some label
    # the calibrated checkpoint predicts scaled probabilities against scaled thresholds: the same decisions
    calibrated = Predictor.from_checkpoint(tmp_path / "site", device="cpu")
    np.testing.assert_allclose(calibrated.thresholds, stored, atol=1e-12)
    scaled = calibrated.predict(images)
    np.testing.assert_allclose(scaled, probs, atol=1e-5)


def test_calibrate_refuses_bad_targets(tmp_path):
    from cxrlab.inference.calibrate import calibrate

    ckpt = tiny_checkpoint(tmp_path / "ckpt", size=32)
    with pytest.raises(CxrlabError, match="is the checkpoint itself"):
        calibrate(ckpt, "synthetic:10,size=32", tmp_path / "ckpt")
    (tmp_path / "taken").mkdir()
    with pytest.raises(CxrlabError, match="exists"):
        calibrate(ckpt, "synthetic:10,size=32", tmp_path / "taken")
    with pytest.raises(CxrlabError, match="has no official split"):
        calibrate(ckpt, "synthetic:10,size=32", tmp_path / "x", split="test")
    assert not (tmp_path / "x").exists()


def test_calibrated_export_and_server_use_the_temperature(tmp_path, shared_data):
    from cxrlab.inference.calibrate import calibrate
    from cxrlab.inference.export import export_onnx
    from cxrlab.inference.calibrate import scaled_thresholds
    from cxrlab.inference.predictor import Predictor

    ckpt = tiny_checkpoint(tmp_path / "ckpt", size=32)
    calibrate(ckpt, "synthetic:64,size=32,seed=5", tmp_path / "site", temperature=True)
    sidecar = export_onnx(tmp_path / "site", tmp_path / "site.onnx", check=[shared_data / "nih" / "00000001_000.png"])
    info = json.loads((tmp_path / "site" / "checkpoint.json").read_text())
    assert sidecar["temperature"] == info["temperature"] and sidecar["threshold_source"] == info["threshold_source"]
    assert sidecar["thresholds"] == info["thresholds"]  # one card, one convention: the unscaled scale
    onnx = Predictor.from_onnx(tmp_path / "site.onnx")
    output_scale = scaled_thresholds(info["thresholds"], info["temperature"])
    np.testing.assert_allclose(onnx.thresholds, output_scale, atol=1e-12)
    fitted = np.random.default_rng(0).integers(0, 255, (16, 32, 32)).astype(np.uint8)
    scaled = onnx.predict_fitted(fitted)
    # the checkpoint predictor (what the server runs) applies the same temperature: the same
    # probabilities and thresholds
    predictor = Predictor.load(tmp_path / "site", device="cpu", threads=1)
    np.testing.assert_allclose(predictor.predict_fitted(fitted), scaled, atol=1e-5)
    np.testing.assert_allclose(predictor.thresholds, output_scale, atol=1e-12)
    # and the temperature did something: the model's raw probabilities differ
    raw = Predictor.from_model(predictor.model, predictor.label_names, image_size=32).predict_fitted(fitted)
    assert not np.allclose(raw, scaled, atol=1e-3)


def test_threshold_scales_round_trip():
    from cxrlab.inference.calibrate import scaled_thresholds, unscaled_thresholds

    t, temperature = np.array([0.1, 0.5, 0.93]), np.array([0.5, 2.0, 3.0])
    np.testing.assert_allclose(scaled_thresholds(unscaled_thresholds(t, temperature), temperature), t)
    assert scaled_thresholds(t, None).tolist() == t.tolist()
    assert unscaled_thresholds([0.5], [4.0])[0] == pytest.approx(0.5)  # logit 0 is fixed by any temperature


def test_calibrate_reports_ece_and_brier_before_and_after(tmp_path, capsys):
    from cxrlab.checkpoint import read_info
    from cxrlab.cli import main
    from cxrlab.data.policies import apply_policy
    from cxrlab.data.sources import parse_source
    from cxrlab.inference.predictor import Predictor
    from cxrlab.labels import LabelSpace
    from cxrlab.metrics import brier_score, expected_calibration_error

    ckpt = tiny_checkpoint(tmp_path / "ckpt", "linear", size=32, thresholds=(0.3, 0.5, 0.6))
    fit, held = "synthetic:96,size=32,seed=3", "synthetic:64,size=32,seed=4"
    assert main(["calibrate", str(ckpt), "--data", fit, "--out", str(tmp_path / "site"), "--temperature",
                 "--holdout", held]) == 0
    printed = capsys.readouterr().out
    assert "fitted data: mean ECE" in printed and f"held-out {held}: mean ECE" in printed
    table = read_info(tmp_path / "site")["calibration"]["before_after"]
    assert table["bins"] == 10 and table["holdout"]["source"] == held
    t = np.asarray(read_info(tmp_path / "site")["temperature"])
    for part, source in (("fitted", fit), ("holdout", held)):
        # by hand: the original checkpoint's probabilities, then scaled by the fitted temperatures
        records = parse_source(source)
        cols = [records.labels.names.index(n) for n in LABELS]
        result = apply_policy(records.values[:, cols], LabelSpace("t", LABELS), "full")
        probs = Predictor.from_checkpoint(ckpt, device="cpu").predict(
            [records.read(int(r)) for r in result.rows]).astype(np.float64)
        z = np.log(probs) - np.log1p(-probs)
        for when, p in (("before", probs), ("after", 1 / (1 + np.exp(-z / t)))):
            known = result.mask > 0
            ece = [expected_calibration_error(p[known[:, j], j], result.target[known[:, j], j], 10) for j in range(3)]
            brier = [brier_score(p[known[:, j], j], result.target[known[:, j], j]) for j in range(3)]
            got = table[part][when]
            assert got["mean_ece"] == pytest.approx(np.mean(ece), abs=1e-5)
            assert got["mean_brier"] == pytest.approx(np.mean(brier), abs=1e-5)
            assert got["per_label"][LABELS[0]]["ece"] == pytest.approx(ece[0], abs=1e-5)
        assert table[part]["n"] == len(result.rows)
    # the fitted temperatures minimise the fitted data's cross-entropy; its Brier score follows
    assert table["fitted"]["after"]["mean_brier"] <= table["fitted"]["before"]["mean_brier"]
    # thresholds alone do not move probabilities: before equals after; an overlapping hold-out is refused
    from cxrlab.inference.calibrate import calibrate
    same = calibrate(ckpt, fit, tmp_path / "thr")["before_after"]["fitted"]
    assert same["before"] == same["after"]
    with pytest.raises(CxrlabError, match="overlaps the fitted part"):
        calibrate(ckpt, fit, tmp_path / "x", holdout="test")
