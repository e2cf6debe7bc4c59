"""What the command line says (issue 27): progress lines outside a terminal, the run header, --version,
the recipe table and its filters, counts in the singular."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cxrlab import progress
from cxrlab.cli import main
from cxrlab.errors import CxrlabError
from cxrlab.progress import Progress, plural
from cxrlab.workflows.catalog import _leading_sentence, recipe_rows

from conftest import TINY

SRC = Path(__file__).resolve().parents[1] / "src"


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_lines_outside_a_terminal(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    out = io.StringIO()  # not a terminal
    bar = Progress(8, "epoch 1/3", unit="batch", every=5, stream=out)
    clock.now += 2
    bar.update(1, loss=0.5)
    assert out.getvalue() == ""  # 2 s < 5 s: nothing yet
    clock.now += 4  # 6 s in, 3 of 8 batches: 0.5 batch/s, 5 left -> 10 s
    bar.update(2, loss=0.25)
    assert out.getvalue() == "epoch 1/3: 3/8 batches (38 %), 0.5 batch/s, ETA 10 s, loss 0.25\n"
    clock.now += 1
    bar.update(1)  # 1 s after the last line: quiet
    assert out.getvalue().count("\n") == 1
    clock.now += 125
    bar.update(4)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[1] == "epoch 1/3: 8/8 batches (100 %), 0.0606 batch/s, loss 0.25"  # 8 in 132 s; no ETA when done
    assert lines[2] == "epoch 1/3: done, 8 batches in 2 min 12 s"


def test_progress_says_nothing_for_short_steps_or_when_disabled(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    for enabled, every in ((True, 30), (False, 0)):
        out = io.StringIO()
        with Progress(4, "predict", every=every, stream=out, enabled=enabled) as bar:
            clock.now += 1
            bar.update(4)
        assert out.getvalue() == ""  # no progress line, so no closing line either


def test_progress_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv(progress.EVERY_ENV, raising=False)
    assert progress.progress_every() == 30.0
    monkeypatch.setenv(progress.EVERY_ENV, "2.5")
    assert progress.progress_every() == 2.5
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv(progress.EVERY_ENV, bad)
        with pytest.raises(CxrlabError, match="CXRLAB_PROGRESS_EVERY"):
            progress.progress_every()


def test_plural():
    assert plural(1, "row") == "1 row" and plural(0, "row") == "0 rows" and plural(2, "heatmap") == "2 heatmaps"
    assert plural(1500, "image") == "1,500 images" and plural(3, "study", "studies") == "3 studies"


def test_train_outside_a_terminal_prints_the_header_and_progress_lines(tmp_path):
    """A tiny train with stderr a pipe (as in a log file) and a tiny interval: the header comes before the
    first epoch and the trainer's and prepare's progress lines appear."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC), "CXRLAB_PROGRESS_EVERY": "0.000001"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cxrlab.cli", "train", "demo", "--out", str(out), *TINY, "model.backbone=test_resnet",
           f"data.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr.splitlines()
    sizes = json.loads((out / "report" / "metrics.json").read_text())["split_sizes"]
    header = {line.split()[0]: line for line in err if line.split()[:1] in (["recipe"], ["data"], ["split"],
                                                                             ["model"], ["device"], ["out"])}
    assert header["recipe"].startswith("recipe  demo (built-in demo.yaml + data.source=synthetic:160")
    assert header["data"].startswith("data    synthetic:160: 160 images at 32 px (pad), 14 labels")
    # the split in images and patients, as the report counted them
    assert f"train {sizes['train']} images / " in header["split"] and f"test {sizes['test']} images / " in header["split"]
    assert "patients" in header["split"]
    assert header["model"].startswith("model   test_resnet + linear head: ") and "parameters" in header["model"]
    assert header["device"].startswith("device  cpu, float32 (train.amp=auto); 1 thread, ")
    assert header["out"] == f"out     {out}"
    first_epoch = next(i for i, line in enumerate(err) if line.startswith("epoch 1/1"))
    assert err.index(header["recipe"]) < first_epoch  # said before training starts
    progress_lines = [line for line in err if line.startswith("epoch 1/1: ") and "batch/s" in line]
    assert progress_lines and all("loss " in line and "img/s " in line for line in progress_lines)
    assert any(line.startswith("prepare synthetic 32px: ") and "img/s" in line for line in err)
    assert not any("\r" in line for line in err)  # no progress bar outside a terminal


def test_version(capsys):
    assert main(["--version"]) == 0
    lines = capsys.readouterr().out.splitlines()
    import timm
    import torch

    import cxrlab

    assert lines[:3] == [f"cxrlab {cxrlab.__version__}", f"torch {torch.__version__}", f"timm {timm.__version__}"]
    assert lines[3].startswith("CUDA") and ("not available" in lines[3]) == (not torch.cuda.is_available())


def test_list_recipes_table_and_filters(capsys):
    assert main(["list", "recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["recipe", "method", "data", "paper", "description"]
    demo = next(line for line in lines if line.startswith("demo "))
    assert demo.split()[1:3] == ["baseline", "synthetic"] and "The demo: a complete small experiment" in demo
    lcl = next(line for line in lines if line.startswith("lcl_chexpert "))
    assert lcl.split()[1:3] == ["LCL", "CheXpert"] and "Zhang et al. CMPB 245 (2024)" in lcl

    rows = recipe_rows(data="nih", method="lcl")
    assert [r.name for r in rows] == ["lcl_nih"]
    rows = recipe_rows(method="LCL")
    assert {"lcl_synthetic", "lcl_synthetic_bce", "lcl_chexpert"} <= {r.name for r in rows}
    assert next(r for r in rows if r.name == "lcl_synthetic_bce").method == "baseline"  # kept: named after LCL
    assert {r.data for r in recipe_rows(data="Synthetic")} == {"synthetic"}
    assert {r.method for r in recipe_rows(method="mpc")} == {"MPC"}

    assert main(["list", "recipes", "--names", "--data", "nih", "--filter", "lcl*"]) == 0
    assert capsys.readouterr().out.split() == ["lcl_nih"]
    assert main(["list", "recipes", "--data", "nhi"]) == 2
    assert "did you mean 'nih'" in capsys.readouterr().err
    assert main(["list", "heads", "--method", "lcl"]) == 2
    assert main(["list", "heads", "--filter", "l*"]) == 0
    assert set(capsys.readouterr().out.split()) == {"label_query", "lcl", "linear"}


def test_list_backbones_filter(capsys):
    assert main(["list", "backbones", "--filter", "convnext*"]) == 0
    names = capsys.readouterr().out.split()
    assert "convnext_tiny" in names and all(n.startswith("convnext") for n in names)


def test_recipe_description_is_the_first_sentence_of_its_comment():
    text = "# DWML (Jin, Comput. Biol. Med. 157 (2023)) on NIH: the split. More here.\n# Next line.\ncite: x\n# late\n"
    assert _leading_sentence(text) == "DWML (Jin, Comput. Biol. Med. 157 (2023)) on NIH: the split."
    assert _leading_sentence("# Baseline: BCE on nih,\n# densenet121\ndata: {}\n") == "Baseline: BCE on nih, densenet121"
    assert _leading_sentence("data: {}\n") == ""


def test_did_you_mean_quotes_the_whole_key(tmp_path, capsys):
    assert main(["train", "demo", "--out", str(tmp_path / "r"), "train.epochz=1"]) == 2
    assert "did you mean 'train.epochs'?" in capsys.readouterr().err


def test_evaluate_takes_eval_overrides(trained, tmp_path, capsys):
    root, _ = trained
    model, data = str(root / "run" / "best"), "synthetic:96,seed=5,size=32"
    plain = tmp_path / "plain"
    assert main(["evaluate", model, "--data", data, "--out", str(plain)]) == 0
    base = json.loads((plain / "metrics.json").read_text())
    assert "auc_ci" not in base["per_label"]["Effusion"] or base["per_label"]["Effusion"]["auc_ci"] is None
    out = tmp_path / "strict"
    assert main(["evaluate", model, "--data", data, "--out", str(out), "eval.bootstrap=50",
                 "eval.min_positives=6", "eval.exclude_unreliable=true"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    per_label = metrics["per_label"]
    # labels with an AUC (both classes present) and fewer than 6 positives
    few = sorted(name for name, m in per_label.items() if m["auc"] is not None and m["n_positive"] < 6)
    assert few and sorted(metrics["unreliable_labels"]) == few
    kept = [m["auc"] for name, m in per_label.items() if name not in few and m["auc"] is not None]
    assert len(kept) >= 2
    assert metrics["macro_auc"] == pytest.approx(sum(kept) / len(kept))  # the flagged labels are left out
    ci = per_label["Effusion"]["auc_ci"]
    assert ci[0] <= per_label["Effusion"]["auc"] <= ci[1]
    # only what evaluate can use, named in the error
    for bad in ("eval.threshold=youden", "train.epochs=3", "eval.bootstrapp=10"):
        assert main(["evaluate", model, "--data", data, "--out", str(tmp_path / "x"), "--overwrite", bad]) == 2
        err = capsys.readouterr().err
        assert "evaluate takes eval.bootstrap, eval.ci, eval.min_positives, eval.exclude_unreliable" in err
    assert "did you mean 'eval.bootstrap'?" in err


def test_demo_predicts_on_test_images_and_says_so(tmp_path, capsys):
    import pandas as pd

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY, "model.backbone=test_resnet"]) == 0
    said = capsys.readouterr().out
    assert "[3/4] predicting on 4 images of the run's test part (never trained or selected on)" in said
    # the sample files name their row of the prepared data; those rows are the run's test images
    index = pd.read_csv(next((out / "cache").rglob("index.csv")))
    tested = set(pd.read_csv(out / "run" / "report" / "test_predictions.csv")["path"])
    rows = [int(p.stem.split("_")[1]) for p in sorted((out / "samples").glob("test_*.png"))]
    assert len(rows) == 4 and all(index["path"][row] in tested for row in rows)
    table = pd.read_csv(out / "predictions.csv")
    assert sorted(Path(p).name for p in table["path"]) == sorted(f"test_{row}.png" for row in rows)
    for row in rows:  # each line shows the image's own labels (the findings first: these have one)
        labels = [name for name in index.columns[5:] if index[name][row] == 1]
        assert labels and f"test_{row}.png" in said and ", ".join(labels) in said
