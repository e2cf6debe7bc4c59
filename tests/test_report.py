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
    assert sorted(f.name for f in tmp_path.iterdir()) == ["auc_bars.png", "metrics.json", "reliability.png", "report.md", "roc_curves.png"]


def test_cooccurrence_and_side_by_side_matrices(tmp_path):
    t = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 1, 1]], dtype=float)
    mask = np.ones_like(t)
    mask[3, 2] = 0                                                   # unknown entries leave both counts
    c = label_cooccurrence(t, mask)
    assert c[0, 1] == 2 / 3 and c[0, 2] == 0 / 2 and c[1, 2] == 1 / 2 and c[2, 2] == 1
    learned = np.array([[1, -0.4, 0.2], [-0.4, 1, 0.1], [0.2, 0.1, 1]])
    out = plot_matrices(tmp_path / "m.png", {"data P(j|i)": c, "learned": learned}, ["a", "b", "c"])
    assert out.stat().st_size > 0


def test_training_curves_put_throughput_on_its_own_panel(tmp_path):
    from cxrlab.evaluation.plots import TRAIN_LOSS_TITLE, VAL_LOSS_TITLE, history_panels, plot_history

    history = [{"epoch": e, "train_loss": 1 / (e + 1), "train_bce": 0.8 / (e + 1), "val_loss": 1.1 / (e + 1),
                "val_macro_auc": 0.6 + 0.01 * e, "lr": 1e-3 / (e + 1), "train_img_s": 150.0 + e,
                "pseudo_pos_count": 10.0 * e, "step": 10 * e, "epoch_time_s": 3.0} for e in range(3)]
    panels = {title: keys for title, keys, _ in history_panels(history)}
    assert panels == {TRAIN_LOSS_TITLE: ["train_loss", "train_bce"], VAL_LOSS_TITLE: ["val_loss"],
                      "metrics": ["val_macro_auc"],
                      "learning rate": ["lr"], "throughput (per second)": ["train_img_s"],
                      "other statistics": ["pseudo_pos_count"]}  # step and epoch time are bookkeeping
    assert [log for _, _, log in history_panels(history)] == [False, False, False, True, False, False]
    assert plot_history(tmp_path / "curves.png", history, {"epoch": 1, "on": "val_macro_auc"}).stat().st_size > 0


def _few_positives(n=300, seed=2):
    """Three labels with plenty of positives and Hernia with exactly 2."""
    rng = np.random.default_rng(seed)
    t = (rng.random((n, 4)) < 0.3).astype(float)
    t[:, 3] = 0
    t[[5, 77], 3] = 1
    p = np.clip(0.3 * t + 0.7 * rng.random((n, 4)), 0, 1)
    p[[5, 77], 3] = 0.01  # the two positives scored lowest: AUC near 0 on two images
    return p, t, np.ones_like(t)


def test_labels_with_few_positives_are_flagged_and_optionally_left_out_of_macros():
    p, t, mask = _few_positives()
    kept = multilabel_report(p, t, mask, NAMES, bootstrap=50, min_positives=10)
    assert kept["unreliable_labels"] == ["Hernia"] and kept["min_positives"] == 10
    assert kept["per_label"]["Hernia"]["reliable"] is False and kept["per_label"]["Effusion"]["reliable"] is True
    aucs = [kept["per_label"][n]["auc"] for n in NAMES]
    assert kept["macro_auc"] == np.mean(aucs) and kept["macro_excludes_unreliable"] is False
    dropped = multilabel_report(p, t, mask, NAMES, bootstrap=50, min_positives=10, exclude_unreliable=True)
    assert dropped["macro_auc"] == np.mean(aucs[:3]) and dropped["micro_auc"] == kept["micro_auc"]
    assert dropped["map"] == np.mean([kept["per_label"][n]["ap"] for n in NAMES[:3]])
    # the macro CI then comes from the same resamples over the reliable labels only
    subset = multilabel_report(p[:, :3], t[:, :3], mask[:, :3], NAMES[:3], bootstrap=50)
    assert dropped["macro_auc_ci"] == subset["macro_auc_ci"] != kept["macro_auc_ci"]
    assert multilabel_report(p, t, mask, NAMES, min_positives=2)["unreliable_labels"] == []  # 2 is enough
    assert multilabel_report(p, t, mask, NAMES)["unreliable_labels"] == []  # no floor by default


def test_report_marks_unreliable_labels_in_table_text_and_plots(tmp_path):
    p, t, mask = _few_positives()
    for exclude, verdict in ((False, "still included in the macro averages"), (True, "left out of the macro")):
        metrics = multilabel_report(p, t, mask, NAMES, min_positives=10, exclude_unreliable=exclude)
        md = write_report(tmp_path / str(exclude), metrics, p, t, mask, NAMES).read_text()
        assert "| Hernia † |" in md and "| Effusion |" in md
        assert "fewer than 10 positives among the evaluated images**: Hernia (n+ = 2)" in md and verdict in md
    clean = multilabel_report(p[:, :3], t[:, :3], mask[:, :3], NAMES[:3], min_positives=10)
    md = write_report(tmp_path / "clean", clean, p[:, :3], t[:, :3], mask[:, :3], NAMES[:3]).read_text()
    assert "†" not in md and "Every label has at least 10 positives" in md
    from cxrlab.evaluation.plots import unreliable

    assert unreliable(metrics["per_label"]["Hernia"]) and not unreliable(metrics["per_label"]["Atelectasis"])
    assert not unreliable({"auc": 0.7})  # a report written before the flag existed
