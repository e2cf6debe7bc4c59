"""`cxrlab ensemble`: a checkpoint folder that averages member probabilities (MSML's fusion)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrlab.checkpoint import load_model, module_tensors, save_checkpoint
from cxrlab.config import Recipe
from cxrlab.ensemble import EnsembleModel
from cxrlab.workflows.ensemble import build_ensemble
from cxrlab.errors import CxrlabError
from cxrlab.models import build_model

LABELS = ["a", "b", "c"]


def make_checkpoint(folder, seed: int, labels=LABELS, head: str = "linear", image_size: int = 32, thresholds=None):
    recipe = Recipe()
    recipe.name = f"m{seed}"
    recipe.data.image_size = image_size
    recipe.model.head = head
    recipe.model.backbone = "test_resnet"
    torch.manual_seed(seed)
    model = build_model("test_resnet", head, len(labels))
    with torch.no_grad():  # distinct, non-trivial outputs per member
        for p in model.head.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    info = {"recipe": recipe.to_dict(), "labels": list(labels),
            "thresholds": thresholds or [0.5] * len(labels)}
    save_checkpoint(folder, module_tensors({"model": model}), {}, {"state": {}, "param_groups": []}, info)
    return folder, model.eval()


def images(n=4):
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(0))


def test_ensemble_of_one_is_that_model(tmp_path):
    folder, model = make_checkpoint(tmp_path / "m0", 0, thresholds=[0.2, 0.4, 0.6])
    out = build_ensemble([folder], tmp_path / "ens")
    ensemble, info = load_model(out)
    assert isinstance(ensemble, EnsembleModel) and info["labels"] == LABELS
    assert info["thresholds"] == pytest.approx([0.2, 0.4, 0.6])
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(ensemble(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)


def test_two_models_average_probabilities_with_weights_and_labels_by_name(tmp_path):
    f0, m0 = make_checkpoint(tmp_path / "m0", 0)
    # the second member orders its labels differently and has an extra "No Finding" output
    f1, m1 = make_checkpoint(tmp_path / "m1", 1, labels=["c", "No Finding", "a", "b"])
    x = images()
    with torch.no_grad():
        p0 = torch.sigmoid(m0(x).logits)
        p1 = torch.sigmoid(m1(x).logits)[:, [2, 3, 0]]
    for weights, expected in ((None, (p0 + p1) / 2), ([3, 1], 0.75 * p0 + 0.25 * p1)):
        out = build_ensemble([f0, f1], tmp_path / f"ens{weights}", weights=weights)
        ensemble, info = load_model(out)
        assert info["labels"] == LABELS
        with torch.no_grad():
            torch.testing.assert_close(torch.sigmoid(ensemble(x).logits), expected, atol=1e-5, rtol=1e-4)
    manifest = json.loads((out / "checkpoint.json").read_text())
    assert [m["weight"] for m in manifest["members"]] == [0.75, 0.25]
    assert all(len(m["sha256"]) == 2 for m in manifest["members"])


def test_predictor_and_heatmaps_accept_an_ensemble(tmp_path):
    from cxrlab.inference.heatmaps import label_heatmaps
    from cxrlab.inference.predictor import Predictor

    f0, _ = make_checkpoint(tmp_path / "m0", 0)
    f1, _ = make_checkpoint(tmp_path / "m1", 1)
    out = build_ensemble([f0, f1], tmp_path / "ens")
    predictor = Predictor.from_checkpoint(out)
    probs = predictor.predict([np.random.default_rng(0).random((50, 40))])
    assert probs.shape == (1, 3) and ((probs > 0) & (probs < 1)).all()
    ensemble, _ = load_model(out)
    p, maps = label_heatmaps(ensemble, images(2))
    assert p.shape == (2, 3) and maps.shape == (2, 3, 32, 32)
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6


def test_bad_ensembles_are_clear_errors(tmp_path):
    f0, _ = make_checkpoint(tmp_path / "m0", 0)
    other, _ = make_checkpoint(tmp_path / "other", 1, labels=["a", "b", "d"])
    with pytest.raises(CxrlabError, match=r"label spaces differ: .*other has \['d'\].*lacks \['c'\]"):
        build_ensemble([f0, other], tmp_path / "e1")
    big, _ = make_checkpoint(tmp_path / "big", 2, image_size=64)
    with pytest.raises(CxrlabError, match=r"big/checkpoint.json has input size 64"):
        build_ensemble([f0, big], tmp_path / "e2")
    with pytest.raises(CxrlabError, match="2 weights for 1 checkpoints"):
        build_ensemble([f0], tmp_path / "e3", weights=[1, 2])
    with pytest.raises(CxrlabError, match="weights must be positive"):
        build_ensemble([f0], tmp_path / "e4", weights=[0])
    out = build_ensemble([f0], tmp_path / "e5")
    with pytest.raises(CxrlabError, match="is itself an ensemble"):
        build_ensemble([out], tmp_path / "e6")
    with pytest.raises(CxrlabError, match="already exists"):
        build_ensemble([f0], out)
    member = next((out / "members").iterdir()) / "model.safetensors"
    data = member.read_bytes()
    member.unlink()  # a hard link: write a new file rather than corrupting the original member
    member.write_bytes(data[:-8] + b"\0" * 8)
    with pytest.raises(CxrlabError, match="is corrupt"):
        load_model(out)
    bilinear, _ = make_checkpoint(tmp_path / "bil", 3, head="bilinear")
    from cxrlab.inference.heatmaps import label_heatmaps

    ensemble, _ = load_model(build_ensemble([f0, bilinear], tmp_path / "e7"))
    with pytest.raises(CxrlabError, match="ensemble member 1: head 'bilinear' has no class activation map"):
        label_heatmaps(ensemble, images(1))


def test_ensemble_command(tmp_path, capsys):
    from cxrlab.cli import main

    f0, _ = make_checkpoint(tmp_path / "m0", 0)
    f1, _ = make_checkpoint(tmp_path / "m1", 1)
    assert main(["ensemble", str(f0), str(f1), "--out", str(tmp_path / "ens"), "--weights", "2,1"]) == 0
    assert "ensemble of 2 models" in capsys.readouterr().out
    _, info = load_model(tmp_path / "ens")
    assert [m["weight"] for m in info["members"]] == pytest.approx([2 / 3, 1 / 3])
    assert main(["ensemble", str(f0), "--out", str(tmp_path / "bad"), "--weights", "two"]) == 2
    assert "--weights 'two'" in capsys.readouterr().err


def test_evaluate_scores_an_ensemble_like_a_single_model(tmp_path):
    from cxrlab.labels import NIH14
    from cxrlab.workflows.evaluate import evaluate_checkpoint

    f0, _ = make_checkpoint(tmp_path / "m0", 0, labels=list(NIH14.names))
    f1, _ = make_checkpoint(tmp_path / "m1", 1, labels=list(NIH14.names) + ["No Finding"])
    ens = build_ensemble([f0, f1], tmp_path / "ens")
    report = evaluate_checkpoint(ens, "synthetic:40,size=32", tmp_path / "eval")
    single = evaluate_checkpoint(f0, "synthetic:40,size=32", tmp_path / "eval0")
    a = json.loads((Path(report).parent / "metrics.json").read_text())
    b = json.loads((Path(single).parent / "metrics.json").read_text())
    assert set(a) == set(b) and set(a["per_label"]) == set(NIH14.names)
