"""The workflows checked against the parts they are made of: a run's metrics.json is the metrics of its
test predictions, serving a raw file gives what training saw through the cache, thresholds are applied
as stored, official splits follow their lists, prepared caches and fold files are used and checked."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlab.cli import main
from cxrlab.config import load_recipe
from cxrlab.data.prepared import prepare_data, split_rows
from cxrlab.errors import CxrlabError
from cxrlab.metrics import multilabel_report


def _run_data(trained):
    """The demo run's recipe, its prepared data and its split, rebuilt the way `train` built them."""
    root, overrides = trained
    recipe = load_recipe("demo", overrides)
    data = prepare_data(recipe, progress=False)
    return root, recipe, data, split_rows(recipe, data)


def test_metrics_json_is_the_report_of_the_test_predictions(trained):
    root, recipe, data, parts = _run_data(trained)
    report = root / "run" / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    predictions = pd.read_csv(report / "test_predictions.csv")
    names = list(data.eval_labels.names)
    assert predictions["path"].tolist() == data.index["path"].iloc[parts["test"]].tolist()
    thresholds = [metrics["per_label"][n]["threshold"] for n in names]
    again = multilabel_report(predictions[names].to_numpy(), data.eval_target[parts["test"]],
                              data.eval_mask[parts["test"]], names, thresholds=thresholds)
    # the CSV holds 6 decimals: ranks (and so AUC/AP) can only move where two scores round together
    for key in ("macro_auc", "map", "micro_auc"):
        assert again[key] == pytest.approx(metrics[key], abs=2e-3), key
    for name in names:
        assert again["per_label"][name]["n_positive"] == metrics["per_label"][name]["n_positive"]


def test_serving_a_raw_file_matches_training_through_the_cache(trained, tmp_path):
    """Training/serving parity: the test images written as PNG files and read back through `predict`
    (decode -> fit -> normalise -> model) give the probabilities the trainer's eval path wrote."""
    root, recipe, data, parts = _run_data(trained)
    expected = pd.read_csv(root / "run" / "report" / "test_predictions.csv")
    rows = data.image_rows[parts["test"][:12]]
    files = []
    for k, row in enumerate(rows):
        files.append(tmp_path / f"img{k:02d}.png")
        Image.fromarray(np.asarray(data.images[row])).save(files[-1])
    out = tmp_path / "served.csv"
    assert main(["predict", str(root / "run" / "best"), *map(str, files), "--out", str(out)]) == 0
    served = pd.read_csv(out)
    names = list(data.eval_labels.names)
    np.testing.assert_allclose(served[names].to_numpy(), expected[names].to_numpy()[:12], atol=2e-5)
    # the decisions are the probabilities at the checkpoint's stored thresholds, label by label
    stored = json.loads((root / "run" / "best" / "checkpoint.json").read_text())["thresholds"]
    labels = json.loads((root / "run" / "best" / "checkpoint.json").read_text())["labels"]
    for name, thr in zip(labels, stored):
        assert (served[f"{name}_positive"].to_numpy() == (served[name].to_numpy() >= thr)).all(), name
    assert len(set(stored)) > 1  # fitted per label, not one default


def test_evaluate_on_files_reproduces_the_run_metrics(trained, tmp_path):
    """`evaluate` of the checkpoint on its own test images (as PNG files in a csv: source) gives the
    run's test AUC: same images, same model, same thresholds."""
    root, recipe, data, parts = _run_data(trained)
    metrics = json.loads((root / "run" / "report" / "metrics.json").read_text())
    names = list(data.eval_labels.names)
    rows = parts["test"]
    table = {"path": [], "patient_id": []}
    for k, row in enumerate(rows):
        path = tmp_path / f"t{k:03d}.png"
        Image.fromarray(np.asarray(data.images[data.image_rows[row]])).save(path)
        table["path"].append(str(path))
        table["patient_id"].append(str(data.index["patient_id"].iloc[row]))
    labels = pd.DataFrame(data.eval_target[rows], columns=names).astype(int)
    pd.concat([pd.DataFrame(table), labels], axis=1).to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "eval"
    assert main(["evaluate", str(root / "run" / "best"), "--data", f"csv:{tmp_path / 'labels.csv'}",
                 "--out", str(out)]) == 0
    scored = json.loads((out / "metrics.json").read_text())
    assert scored["macro_auc"] == pytest.approx(metrics["macro_auc"], abs=1e-3)
    assert scored["map"] == pytest.approx(metrics["map"], abs=1e-3)
    # the training recipe's eval.min_positives flags the same few-positive labels in both reports
    assert scored["min_positives"] == metrics["min_positives"] == recipe.eval.min_positives
    assert scored["unreliable_labels"] == metrics["unreliable_labels"]
    assert metrics["unreliable_labels"] == [n for n in names if 0 < metrics["per_label"][n]["n_positive"]
                                            < recipe.eval.min_positives]


def test_evaluate_maps_nih_labels_onto_chexpert_names(trained, tmp_path):
    """A NIH-trained model scored on a CheXpert-vocabulary source: the overlapping labels are paired
    through the mapping and the report says which were mapped and which could not be scored."""
    from cxrlab.labels import label_pairs

    pairs, mapped, unscored = label_pairs(["Effusion", "Cardiomegaly", "Hernia", "No Finding"],
                                          ["Cardiomegaly", "Pleural Effusion", "Edema"])
    assert pairs == [(0, 1, "Effusion → Pleural Effusion"), (1, 0, "Cardiomegaly")]
    assert list(mapped) == ["Effusion → Pleural Effusion"] and unscored == ["Hernia"]
    # the reverse direction maps only where it is one-to-one ("Lung Lesion" is Mass or Nodule)
    pairs, _, unscored = label_pairs(["Pleural Effusion", "Lung Lesion"], ["Effusion", "Mass", "Nodule"])
    assert pairs == [(0, 0, "Pleural Effusion → Effusion")] and unscored == ["Lung Lesion"]

    root, recipe, data, parts = _run_data(trained)
    rows = parts["test"]
    names = {"Effusion": "Pleural Effusion", "Cardiomegaly": "Cardiomegaly", "Atelectasis": "Atelectasis"}
    table = pd.DataFrame({"path": [], "patient_id": []})
    paths = []
    for k, row in enumerate(rows):
        paths.append(str(tmp_path / f"c{k:03d}.png"))
        Image.fromarray(np.asarray(data.images[data.image_rows[row]])).save(paths[-1])
    table = pd.DataFrame({"path": paths, "patient_id": [f"p{k}" for k in range(len(rows))]})
    for nih, chexpert in names.items():
        table[chexpert] = data.eval_target[rows, data.labels.index(nih)].astype(int)
    table.to_csv(tmp_path / "chexpert_like.csv", index=False)
    out = tmp_path / "mapped"
    assert main(["evaluate", str(root / "run" / "best"), "--data", f"csv:{tmp_path / 'chexpert_like.csv'}",
                 "--out", str(out)]) == 0
    scored = json.loads((out / "metrics.json").read_text())
    assert set(scored["per_label"]) == {"Effusion → Pleural Effusion", "Cardiomegaly", "Atelectasis"}
    assert "Effusion → Pleural Effusion" in scored["label_mapping"] and "Mass" in scored["unscored_labels"]
    run = json.loads((root / "run" / "report" / "metrics.json").read_text())["per_label"]
    if run["Effusion"]["auc"] is not None:
        assert scored["per_label"]["Effusion → Pleural Effusion"]["auc"] == pytest.approx(run["Effusion"]["auc"],
                                                                                         abs=1e-3)


def _fake_nih(root: Path, patients: int = 12, per_patient: int = 3) -> list[str]:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, names = [], []
    for p in range(patients):
        for k in range(per_patient):
            name = f"{p + 1:08d}_{k:03d}.png"
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(root / name)
            label = ["No Finding", "Effusion", "Atelectasis|Effusion", "Mass"][(p + k) % 4]
            rows.append(f"{name},{label},{k},{p + 1},50,M,PA,16,16,0.1,0.1")
            names.append(name)
    header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
    (root / "Data_Entry_2017.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return names


def test_official_split_of_the_nih_base_recipes(tmp_path):
    """`*_base` recipes use data.split=official: the test part is test_list.txt exactly; validation is
    carved from train_val by patient, so no patient is in two parts."""
    names = _fake_nih(tmp_path / "nih")
    test_names = [n for n in names if int(n[:8]) > 9]
    (tmp_path / "nih" / "train_val_list.txt").write_text("\n".join(n for n in names if n not in test_names) + "\n")
    (tmp_path / "nih" / "test_list.txt").write_text("\n".join(test_names) + "\n")
    recipe = load_recipe("nih_base", [f"data.source=nih:{tmp_path / 'nih'}", "data.image_size=16",
                                      f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.25"])
    data = prepare_data(recipe, progress=False)
    parts = split_rows(recipe, data)
    file_of = data.index["path"].map(lambda p: Path(p).name)
    assert sorted(file_of.iloc[parts["test"]]) == sorted(test_names)
    assert sorted(file_of.iloc[np.r_[parts["train"], parts["val"]]]) == sorted(set(names) - set(test_names))
    patients = {k: set(data.index["patient_id"].iloc[v]) for k, v in parts.items()}
    assert not patients["train"] & patients["val"] and not patients["val"] & patients["test"]
    assert len(parts["val"]) > 0


def test_string_choices_are_checked_when_the_recipe_loads():
    for key, bad, hint in [("data.policy", "uones", "u_ones"), ("data.split", "oficial", "official"),
                           ("optim.name", "adamm", "adam"), ("train.amp", "bf61", "bf16"),
                           ("train.select_on", "macro_aucc", "macro_auc"), ("schedule.name", "cosin", "cosine"),
                           ("eval.threshold", "f2", "f1"), ("data.resize", "pads", "pad")]:
        with pytest.raises(CxrlabError, match=f"{key}.*did you mean '{hint}'"):
            load_recipe("demo", [f"{key}={bad}"])


def test_train_from_a_prepared_cache_folder(tmp_path, capsys):
    cache = tmp_path / "prepared"
    assert main(["prepare", "synthetic:96,size=32", "--size", "32", "--out", str(cache), "--quiet"]) == 0
    common = ["data.source=synthetic:96,size=32", "train.epochs=1", "eval.bootstrap=0", f"data.cache={cache}",
              f"data.cache_dir={tmp_path / 'unused'}"]
    assert main(["train", "demo", "--out", str(tmp_path / "run"), "data.image_size=32", *common]) == 0
    assert not (tmp_path / "unused").exists()  # trained from the named folder, made no cache of its own
    capsys.readouterr()
    assert main(["train", "demo", "--out", str(tmp_path / "run2"), "data.image_size=48", *common]) == 2
    assert "32px" in capsys.readouterr().err
    assert main(["train", "demo", "--out", str(tmp_path / "run3"), "data.image_size=32", *common,
                 "data.source=synthetic:80,size=32"]) == 2
    assert "another source" in capsys.readouterr().err


def test_cv_uses_a_folds_file_from_data_split(trained, tmp_path, capsys):
    root, overrides = trained
    folds = tmp_path / "folds.csv"
    assert main(["data", "split", "synthetic:160", "--folds", "2", "--repeats", "1", "--out", str(folds)]) == 0
    out = tmp_path / "cv"
    assert main(["cv", "demo", "--folds-file", str(folds), "--out", str(out), *overrides]) == 0
    used = pd.read_csv(out / "splits.csv")
    given = pd.read_csv(folds)
    assert used.sort_values("path")["fold"].tolist() == given.sort_values("path")["fold"].tolist()
    assert json.loads((out / "summary.json").read_text())["macro_auc"]["n"] == 2
    other = tmp_path / "other.csv"
    assert main(["data", "split", "synthetic:100", "--folds", "2", "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["cv", "demo", "--folds-file", str(other), "--out", str(tmp_path / "cv2"), *overrides]) == 2
    assert "lacks" in capsys.readouterr().err


def test_linear_head_heatmap_is_the_class_activation_map():
    """label_heatmaps of a linear head = relu(w_c · F + b_c), upsampled and scaled to [0, 1] per map."""
    import torch
    import torch.nn.functional as F

    from cxrlab.inference.heatmaps import label_heatmaps
    from cxrlab.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", "linear", 3).eval()
    x = torch.rand(2, 1, 64, 64)
    probs, maps = label_heatmaps(model, x)
    with torch.no_grad():
        fmap = model.features(x)
        cam = torch.relu(torch.einsum("ld,bdhw->blhw", model.head.fc.weight, fmap)
                         + model.head.fc.bias[None, :, None, None])
        cam = F.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)
        low, high = cam.amin(dim=(2, 3), keepdim=True), cam.amax(dim=(2, 3), keepdim=True)
        expected = ((cam - low) / (high - low).clamp_min(1e-12)).numpy()
        logits = model(x).logits
    np.testing.assert_allclose(maps, expected, atol=1e-5)
    np.testing.assert_allclose(probs, torch.sigmoid(logits).numpy(), atol=1e-6)
    assert maps.shape == (2, 3, 64, 64) and not np.allclose(maps[:, 0], maps[:, 1])


def test_demo_table_flags_unreliable_labels():
    from cxrlab.workflows.demo import _auc_table

    metrics = {"per_label": {"Effusion": {"auc": 0.8, "auc_ci": [0.7, 0.9], "n_positive": 50},
                             "Hernia": {"auc": 0.15, "auc_ci": [0.1, 0.2], "n_positive": 1}},
               "macro_auc": 0.5, "map": 0.2, "macro_f1": 0.1, "unreliable_labels": ["Hernia"], "min_positives": 10}
    lines = _auc_table(metrics).splitlines()
    assert lines[2].endswith("† unreliable") and not lines[1].endswith("unreliable")
    assert "fewer than 10 test positives" in lines[3]
