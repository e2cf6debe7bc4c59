"""MODEL_CARD.md: ``train`` writes it into report/, ``cxrlab card`` writes it for a run, a checkpoint or an
export, and every number in it is metrics.json's (or the checkpoint's thresholds), read back from the page."""
from __future__ import annotations

import json
import re

import pytest

from cxrlab.cli import main
from cxrlab.evaluation.model_card_md import card_markdown, num
from cxrlab.model_card import card_from_json


def table(text: str, header: str) -> dict[str, list[str]]:
    """The rows (first cell -> other cells) of the Markdown table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_train_writes_a_card_whose_numbers_are_metrics_json(trained, tmp_path):
    root, _ = trained
    report = root / "run" / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    info = json.loads((root / "run" / "best" / "checkpoint.json").read_text())
    text = (report / "MODEL_CARD.md").read_text()

    assert "Research use only, not for diagnosis" in text and "synthetic radiographs" in text
    headline = table(text, "| metric | image level")
    assert headline["macro AUC"] == [num(metrics["macro_auc"]), f"[{num(metrics['macro_auc_ci'][0])}, "
                                                                  f"{num(metrics['macro_auc_ci'][1])}]"]
    assert headline["mAP"][0] == num(metrics["map"]) and headline["macro F1 @0.5"][0] == num(metrics["macro_f1_at_0.5"])
    per_label = table(text, "| label | AUC |")
    thresholds = table(text, "| label | threshold |")
    calibration = table(text, "| label | ECE |")
    assert list(per_label) == list(info["labels"]) == list(thresholds)
    for label, threshold in zip(info["labels"], info["thresholds"]):
        m = metrics["per_label"][label]
        auc_ci = f"[{num(m['auc_ci'][0])}, {num(m['auc_ci'][1])}]" if m.get("auc_ci") and m["auc_ci"][0] is not None else ""
        assert per_label[label] == [num(m["auc"]), auc_ci, num(m["ap"]), num(m["f1"]), num(m["sensitivity"]),
                                    num(m["specificity"])]
        assert thresholds[label] == [num(threshold), str(m["n_positive"]), str(m["n_negative"])]
        assert threshold == pytest.approx(m["threshold"])  # the model decides where the metrics were taken
        assert calibration[label] == [num(m["ece"]), num(m["brier"])]
    assert calibration["mean over labels"] == [num(metrics["mean_ece"]), num(metrics["mean_brier"])]
    sizes = ", ".join(f"{k} {v}" for k, v in metrics["split_sizes"].items())
    assert f"- images per part: {sizes}" in text
    assert f"{metrics['protocol']['images']} images" in text
    for label in metrics["unreliable_labels"]:  # known limits: every label under eval.min_positives, with n+
        assert f"{label} (n+ = {metrics['per_label'][label]['n_positive']})" in text
    sha = info["files"]["model.safetensors"]["sha256"]
    assert f"SHA-256 `{sha}`" in text

    # the command writes the same page for the run folder and for its checkpoint folder
    assert main(["card", str(root / "run"), "--out", str(tmp_path / "a.md")]) == 0
    assert main(["card", str(root / "run" / "best"), "--out", str(tmp_path / "b.md")]) == 0
    assert (tmp_path / "a.md").read_text() == (tmp_path / "b.md").read_text() == text
    assert main(["card", str(root / "run"), "--out", str(tmp_path / "a.md")]) == 2  # exists: --overwrite
    assert main(["card", str(tmp_path), "--out", str(tmp_path / "c.md")]) == 2  # not a run


def test_card_of_an_export_names_its_hash_and_the_runs_metrics(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    root, _ = trained
    out = tmp_path / "model.onnx"
    assert main(["export", str(root / "run"), "--out", str(out)]) == 0
    sidecar = json.loads((tmp_path / "model.onnx.json").read_text())
    text = (tmp_path / "model.onnx.card.md").read_text()
    metrics = json.loads((root / "run" / "report" / "metrics.json").read_text())
    assert f"ONNX export: SHA-256 `{sidecar['model_sha256']}`" in text
    assert table(text, "| metric | image level")["macro AUC"][0] == num(metrics["macro_auc"])


def test_without_metrics_the_card_says_so_and_prints_no_numbers():
    card = card_from_json({"labels": ["A", "B"], "thresholds": [0.25, 0.75],
                           "input": {"size": 32}, "training": {"source": "nih:/data"}}, "test")
    text = card_markdown(card, None, {})
    assert "so this card has no test metrics" in text
    assert table(text, "| label | threshold |") == {"A": ["0.2500", "–", "–"], "B": ["0.7500", "–", "–"]}
    assert not re.search(r"synthetic", text)
