"""The command line end to end on tiny synthetic data: train -> report -> predict -> evaluate, cv, compare."""
import json

import numpy as np
import pandas as pd
import pytest

from cxrlab.cli import main

from conftest import TINY


def test_train_writes_the_report(trained):
    root, _ = trained
    report = root / "run" / "report"
    for name in ("report.md", "metrics.json", "config.json", "roc_curves.png", "auc_bars.png",
                 "cooccurrence.png", "training_curves.png", "test_predictions.csv"):
        assert (report / name).is_file(), name
    metrics = json.loads((report / "metrics.json").read_text())
    for key in ("macro_auc", "micro_auc", "map", "macro_f1", "micro_f1", "per_label"):
        assert key in metrics
    assert set(metrics["per_label"]["Effusion"]) >= {"auc", "ap", "f1", "threshold", "n_positive"}
    assert (root / "run" / "log.csv").is_file() and (root / "run" / "best").is_dir()


def test_predict_real_images_and_folders(trained, shared_data, tmp_path):
    root, _ = trained
    out = tmp_path / "pred.csv"
    images = [shared_data / "nih" / "00000001_000.png", shared_data / "covid" / "16747_3_1.jpg",
              shared_data / "dicom" / "monochrome1_example.dcm"]
    assert main(["predict", str(root / "run" / "best"), *map(str, images), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert len(table) == 3 and "Effusion" in table.columns and "Effusion_positive" in table.columns
    probs = table["Effusion"].to_numpy()
    assert np.all((probs >= 0) & (probs <= 1))
    folder = tmp_path / "pred_folder.csv"
    assert main(["predict", str(root / "run" / "best"), str(shared_data / "nih"), "--out", str(folder)]) == 0
    assert len(pd.read_csv(folder)) == 2


def test_predict_missing_image_is_a_named_error(trained, tmp_path, capsys):
    root, _ = trained
    missing = tmp_path / "nope.png"
    assert main(["predict", str(root / "run" / "best"), str(missing), "--out", str(tmp_path / "p.csv")]) == 2
    assert "nope.png" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_evaluate_checkpoint_on_a_source(trained, tmp_path):
    root, _ = trained
    out = tmp_path / "eval"
    assert main(["evaluate", str(root / "run" / "best"), "--data", "synthetic:64,seed=7,size=32",
                 "--out", str(out)]) == 0
    metrics = json.loads(next(out.rglob("metrics.json")).read_text())
    assert 0.0 <= metrics["macro_auc"] <= 1.0


def test_cv_and_compare(trained, tmp_path):
    root, overrides = trained
    assert main(["cv", "demo", "--cv", "1x2", "--out", str(tmp_path / "cv"), *overrides]) == 0
    summary = json.loads((tmp_path / "cv" / "summary.json").read_text())
    assert summary["macro_auc"]["n"] == 2
    out = tmp_path / "cmp"
    args = ["compare", "demo", "spml_an", "--seeds", "1", "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    table = json.loads((out / "comparison.json").read_text())
    assert set(table) == {"demo", "spml_an"}
    assert set(table["demo"]["macro_auc"]) == {"mean", "std", "n"}
    assert "| demo |" in (out / "comparison.md").read_text()
    # a second call reads the finished runs back instead of training them again
    log = out / "demo" / "seed0" / "log.csv"
    before = log.stat().st_mtime_ns
    assert main(args) == 0
    assert log.stat().st_mtime_ns == before and json.loads((out / "comparison.json").read_text()) == table
    # each recipe against the reference (default: the first), paired on the same test images
    sig = json.loads((out / "significance.json").read_text())
    assert sig["reference"] == "demo" and list(sig["recipes"]) == ["spml_an"]
    vs_demo = sig["recipes"]["spml_an"]
    n_test = len(pd.read_csv(out / "demo" / "seed0" / "report" / "test_predictions.csv"))
    assert vs_demo["runs"] == 1 and vs_demo["images"] == vs_demo["rows"] == n_test
    auc = vs_demo["macro_auc"]
    assert auc["difference"] == pytest.approx(auc["recipe"] - auc["reference"])
    assert auc["ci"][0] <= auc["difference"] <= auc["ci"][1] and 0 < auc["p_bootstrap"] <= 1
    assert 0 <= auc["p_delong"] <= 1
    assert "## Against the reference `demo`" in (out / "comparison.md").read_text()
    assert main(args + ["--reference", "spml_an", "--resamples", "200"]) == 0  # runs read back, not retrained
    back = json.loads((out / "significance.json").read_text())
    assert back["reference"] == "spml_an" and back["resamples"] == 200
    assert back["recipes"]["demo"]["macro_auc"]["difference"] == pytest.approx(-auc["difference"])
    assert main(args + ["--reference", "spml"]) == 2
    # a single-positive checkpoint predicts an added "No Finding" label; a source without it still scores
    spml = out / "spml_an" / "seed0" / "best"
    assert main(["evaluate", str(spml), "--data", "synthetic:64,seed=3,size=32", "--out", str(tmp_path / "ev")]) == 0
    scored = json.loads(next((tmp_path / "ev").rglob("metrics.json")).read_text())["per_label"]
    assert "No Finding" not in scored and "Effusion" in scored


def test_list_and_bad_commands(capsys):
    assert main(["list", "losses"]) == 0
    listed = capsys.readouterr().out.split()
    for name in ("bce", "weighted_bce", "focal", "asl", "lcl_consistency", "lcl_supcon", "an", "an_ls", "wan",
                 "epr", "role", "ll_r", "ll_ct", "ll_cp", "mpc_ipc", "mpc_fpc", "mpc_btc"):
        assert name in listed
    assert main(["list", "heads"]) == 0
    assert {"linear", "lcl", "label_query"} <= set(capsys.readouterr().out.split())
    assert main(["train", "no_such_recipe", "--out", "x"]) == 2
    assert "no_such_recipe" in capsys.readouterr().err
    assert main(["compare", "demo", "--cv", "3by5", "--out", "x"]) == 2
    assert "3by5" in capsys.readouterr().err


def test_train_under_torchrun_two_cpu_processes(tmp_path):
    """`torchrun -m cxrlab.cli train` (gloo): the main rank builds the cache, one report is written."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cxrlab.cli", "train", "demo", "--out", str(tmp_path / "run"), *TINY,
           f"data.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("report:") == 1
    metrics = json.loads((tmp_path / "run" / "report" / "metrics.json").read_text())
    assert sum(metrics["split_sizes"].values()) == 160


def test_heatmaps_from_lcl_attention_and_linear_cam(trained, shared_data, tmp_path):
    import torch

    from cxrlab.inference.heatmaps import label_heatmaps
    from cxrlab.models import build_model

    x = torch.rand(2, 1, 64, 64)
    for head in ("lcl", "linear"):
        model = build_model("resnet18", head, 5)
        probs, maps = label_heatmaps(model, x)
        assert probs.shape == (2, 5) and maps.shape == (2, 5, 64, 64)
        assert maps.min() >= 0 and maps.max() <= 1
    # the linear head's CAM pooled over space is the head's logit (before ReLU and scaling): check on the raw map
    model = build_model("resnet18", "linear", 3).eval()
    with torch.no_grad():
        fmap = model.features(x)
        cam = torch.einsum("ld,bdhw->blhw", model.head.fc.weight, fmap) + model.head.fc.bias[None, :, None, None]
        assert torch.allclose(cam.mean(dim=(2, 3)), model.head(fmap).logits, atol=1e-5)
    root, _ = trained
    out = tmp_path / "maps"
    assert main(["heatmap", str(root / "run" / "best"), str(shared_data / "nih" / "00000001_000.png"),
                 "--labels", "Cardiomegaly,Effusion", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000001_000_Cardiomegaly.png", "00000001_000_Effusion.png"]
    assert main(["heatmap", str(root / "run" / "best"), str(shared_data / "nih"), "--labels", "Cardiomegalyy",
                 "--out", str(out)]) == 2
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["heatmap", str(root / "run" / "best"), str(shared_data / "nih" / "00000001_000.png"),
                 "--out", str(blocker)]) == 2
    assert blocker.read_text() == "not a folder"


def test_lcl_run_reports_g_against_cooccurrence(trained, tmp_path):
    """With G taken from the data (correlation_source=cooccurrence) the reported agreement is exactly 1."""
    root, overrides = trained
    out = tmp_path / "lcl"
    assert main(["train", "lcl_synthetic_cooccurrence", "--out", str(out), *overrides, "data.split=random",
                 "model.head_args.dim=64", "model.head_args.num_heads=4",
                 "loss.lcl_supcon.in_dim=64"]) == 0
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["g_vs_cooccurrence_r"] == pytest.approx(1.0, abs=1e-5)
    assert (out / "report" / "correlation.png").is_file()
