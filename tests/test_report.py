"""The report directory: every file written, strict JSON round-trip, Markdown naming every label."""
from __future__ import annotations

import json

import numpy as np

from cxrlab.labels import label_cooccurrence
from cxrlab.metrics import multilabel_report
from cxrlab.evaluation.plots import plot_matrices
from cxrlab.evaluation.report import write_report

NAMES = ["Atelectasis", "Cardiomegaly", "Effusion", "Hernia"]


def _set(n=150, seed=0):
    rng = np.random.default_rng(seed)
    t = (rng.random((n, 4)) < 0.3).astype(float)
    p = np.clip(0.3 * t + 0.7 * rng.random((n, 4)), 0, 1)
    mask = np.ones_like(t)
    t[:, 3] = 0                                                      # Hernia: no positives -> undefined
    return p, t, mask


def test_report_writes_all_files_and_round_trips(tmp_path):
    p, t, mask = _set()
    metrics = multilabel_report(p, t, mask, NAMES, thresholds=[0.4, 0.5, 0.6, 0.5], bootstrap=30)
    metrics["extra_nan"] = float("nan")
    history = [{"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.2 / (e + 1), "loss/bce": 0.5 / (e + 1),
                "val_macro_auc": 0.6 + 0.05 * e} for e in range(4)]
    path = write_report(tmp_path / "rep", metrics, p, t, mask, NAMES, config={"name": "demo", "lr": 1e-3},
                        history=history, train_targets=t, train_mask=mask)
    out = tmp_path / "rep"
    assert path == out / "report.md"
    for name in ("metrics.json", "config.json", "report.md", "roc_curves.png", "auc_bars.png",
                 "cooccurrence.png", "training_curves.png"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "metrics.json").read_text()
    assert "NaN" not in text
    loaded = json.loads(text)
    assert loaded["extra_nan"] is None and loaded["per_label"]["Hernia"]["auc"] is None
    del metrics["extra_nan"], loaded["extra_nan"]
    assert loaded == metrics
    assert json.loads((out / "config.json").read_text()) == {"name": "demo", "lr": 1e-3}
    md = path.read_text()
    for label in NAMES:
        assert f"| {label} |" in md
    assert "macro AUC" in md and "Hernia" in md.split("skip labels")[1] and "![ROC curves](roc_curves.png)" in md


def test_report_without_optional_parts(tmp_path):
    p, t, mask = _set(seed=1)
    write_report(tmp_path, multilabel_report(p, t, mask, NAMES), p, t, mask, NAMES)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["auc_bars.png", "metrics.json", "report.md", "roc_curves.png"]


def test_cooccurrence_and_side_by_side_matrices(tmp_path):
    t = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 1, 1]], dtype=float)
    mask = np.ones_like(t)
    mask[3, 2] = 0                                                   # unknown entries leave both counts
    c = label_cooccurrence(t, mask)
    assert c[0, 1] == 2 / 3 and c[0, 2] == 0 / 2 and c[1, 2] == 1 / 2 and c[2, 2] == 1
    learned = np.array([[1, -0.4, 0.2], [-0.4, 1, 0.1], [0.2, 0.1, 1]])
    out = plot_matrices(tmp_path / "m.png", {"data P(j|i)": c, "learned": learned}, ["a", "b", "c"])
    assert out.stat().st_size > 0
