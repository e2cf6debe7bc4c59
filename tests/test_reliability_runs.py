"""Issue 25 (items 1, 2, 3, 6): silent wrong results, each reproduced with its new behaviour.

A run reused on another split, a sidecar that does not match its model, non-finite values passing
checks (parity, tolerance, ensemble weights, predicted probabilities), and leftovers of a ``kill -9``
(loader workers, half-written export files).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from cxrlab.cli import main
from fakes import no_plots as _no_plots, one_error_line

TINY = ["data.source=synthetic:160", "data.image_size=32", "train.epochs=1", "train.batch_size=32",
        "eval.bootstrap=0", "data.val_fraction=0.2", "data.test_fraction=0.25", "model.backbone=test_resnet"]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()




@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def overrides(root):
    return TINY + [f"data.cache_dir={root / 'cache'}"]


@pytest.fixture(scope="module")
def cv_run(root, overrides):
    """A finished 1×2 cross-validation of the demo recipe."""
    import cxrlab.evaluation.report as report

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "write_report", _no_plots)
        assert main(["cv", "demo", "--cv", "1x2", "--out", str(root / "cv"), *overrides]) == 0
    return root / "cv"


# ------------------------------------------------------------------------------- 1. run reuse

def test_cv_refuses_runs_of_another_split_and_reuses_runs_of_the_same(cv_run, overrides, capsys, monkeypatch):
    import cxrlab.evaluation.report as report

    monkeypatch.setattr(report, "write_report", _no_plots)
    logs = {run: sha(cv_run / run / "log.csv") for run in ("r0f0", "r0f1")}
    capsys.readouterr()
    # before: the two 2-fold models were reused as folds 0 and 1 of a 3-fold run (exit 0, wrong summary)
    assert main(["cv", "demo", "--cv", "1x3", "--out", str(cv_run), *overrides]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(cv_run / "r0f0") in line and "another split" in line
    assert "1×2 CV, fold r0f0" in line and "now 1×3 CV, fold r0f0" in line
    assert not (cv_run / "r0f2").exists()
    assert {run: sha(cv_run / run / "log.csv") for run in logs} == logs
    record = json.loads((cv_run / "r0f1" / "split.json").read_text())
    assert record["split"] == "1×2 CV, fold r0f1" and sum(record["sizes"].values()) == 160
    # the same split again: read back, nothing retrained
    assert main(["cv", "demo", "--cv", "1x2", "--out", str(cv_run), *overrides]) == 0
    assert {run: sha(cv_run / run / "log.csv") for run in logs} == logs


def test_an_interrupted_run_of_another_split_is_not_resumed(cv_run, overrides, tmp_path, capsys):
    out = tmp_path / "cv"
    shutil.copytree(cv_run, out)
    shutil.rmtree(out / "r0f0" / "report")  # interrupted after its checkpoint
    record = json.loads((out / "r0f0" / "split.json").read_text())
    record["sha256"] = "0" * 64  # as if the data under it had changed
    (out / "r0f0" / "split.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["cv", "demo", "--cv", "1x2", "--out", str(out), *overrides]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out / "r0f0") in line and "(the same sizes, other images)" in line
    (out / "r0f0" / "split.json").unlink()  # a run from before the record: cannot be shown to match
    assert main(["cv", "demo", "--cv", "1x2", "--out", str(out), *overrides]) == 2
    assert "records no split" in one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------ shared: an export, a NaN checkpoint

@pytest.fixture(scope="module")
def exported(cv_run, root):
    """``model.onnx`` + sidecar of the first fold's model."""
    out = root / "export" / "model.onnx"
    assert main(["export", str(cv_run / "r0f0"), "--out", str(out)]) == 0
    return out


def _with_nan_weight(source: Path, target: Path) -> Path:
    """A copy of checkpoint ``source`` whose head bias of label 4 (Infiltration) is NaN (its checksums updated, so it
    loads: a run that diverged writes such weights)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(source, target)
    info = json.loads((target / "checkpoint.json").read_text())
    for name in info["files"]:
        path = target / name
        with safe_open(str(path), "pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        for key, tensor in tensors.items():
            if key.endswith("head.fc.bias"):
                tensor[3] = float("nan")
        save_file(tensors, str(path), metadata=meta)
        info["files"][name] = {"bytes": path.stat().st_size, "sha256": sha(path)}
    (target / "checkpoint.json").write_text(json.dumps(info))
    return target


@pytest.fixture(scope="module")
def nan_checkpoint(cv_run, root):
    return _with_nan_weight(cv_run / "r0f0" / "best", root / "nan")


@pytest.fixture(scope="module")
def images(root):
    from PIL import Image

    from cxrlab.data.synthetic import make_records

    folder = root / "images"
    folder.mkdir()
    records = make_records(3, seed=3, size=32)
    for i in range(3):
        Image.fromarray((records.read(i) * 255).astype(np.uint8)).save(folder / f"ok_{i}.png")
    return folder


# ------------------------------------------------------------- 2. the sidecar against its model

def _edit_sidecar(exported: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "model.onnx"
    shutil.copy(exported, out)
    side = json.loads(exported.with_name("model.onnx.json").read_text())
    edit(side)
    out.with_name("model.onnx.json").write_text(json.dumps(side))
    return out


def test_a_sidecar_missing_a_label_is_refused_by_predict_and_the_server(exported, images, tmp_path, capsys):
    from cxrlab.inference.server import load_backend

    def drop_label(side):
        for key in ("labels", "thresholds", "temperature"):
            if side.get(key):
                del side[key][5]

    model = _edit_sidecar(exported, tmp_path, drop_label)
    capsys.readouterr()
    # before: "ValueError ... (unexpected ...)" from predict; serve started and shifted labels
    assert main(["predict", str(model), str(images), "--out", str(tmp_path / "p.csv")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{model.with_name('model.onnx.json')} does not match {model}" in line
    assert "the model has 14 outputs but the card lists 13 labels" in line
    assert not (tmp_path / "p.csv").exists()
    with pytest.raises(Exception) as caught:
        load_backend(model)
    assert line.removeprefix("cxrlab: error: ") == str(caught.value)


def test_a_sidecar_with_renamed_labels_is_refused(exported, tmp_path):
    from cxrlab.errors import CxrlabError
    from cxrlab.inference.predictor import Predictor

    def swap(side):
        side["labels"][1], side["labels"][2] = side["labels"][2], side["labels"][1]

    model = _edit_sidecar(exported, tmp_path, swap)
    with pytest.raises(CxrlabError, match=r"label 2 is 'Cardiomegaly' in the model but 'Effusion' in the card"):
        Predictor.load(model)
    assert Predictor.load(exported).label_names[1] == "Cardiomegaly"  # the untouched pair loads


# -------------------------------------------------------------------------- 3. non-finite values

def test_export_of_nan_weights_fails_its_parity_check(nan_checkpoint, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    capsys.readouterr()
    # before: "parity ... = nan" and the model written (nan > tolerance is false)
    assert main(["export", str(nan_checkpoint), "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "failed its parity check" in line and "not finite" in line and "nothing was written" in line
    assert not out.exists() and not out.with_name("model.onnx.json").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tolerance", ["nan", "inf", "0", "-1e-4"])
def test_a_tolerance_that_is_not_finite_and_positive_is_refused_before_work(cv_run, tmp_path, capsys,
                                                                          monkeypatch, tolerance):
    import cxrlab.inference.export as export

    monkeypatch.setattr(export, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "model.onnx"
    capsys.readouterr()
    assert main(["export", str(cv_run / "r0f0"), "--out", str(out), f"--tolerance={tolerance}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--tolerance {float(tolerance)!r}: must be a finite number > 0" in line
    assert not out.exists()


def test_huge_ensemble_weights_do_not_overflow(cv_run, images, tmp_path, capsys):
    from cxrlab.inference.predictor import Predictor

    out = tmp_path / "ens"
    # before: the sum of 1e308 + 1e308 overflowed to inf, each weight became 0 and every probability NaN
    assert main(["ensemble", str(cv_run / "r0f0"), str(cv_run / "r0f1"), "--out", str(out),
                 "--weights", "1e308,1e308"]) == 0
    info = json.loads((out / "checkpoint.json").read_text())
    assert [m["weight"] for m in info["members"]] == [0.5, 0.5]
    ensemble = Predictor.load(out)
    assert ensemble.model.weights.tolist() == [0.5, 0.5]
    files = sorted(images.iterdir())
    probs = ensemble.predict_paths(files)
    members = [Predictor.load(cv_run / run).predict_paths(files) for run in ("r0f0", "r0f1")]
    np.testing.assert_allclose(probs, (members[0] + members[1]) / 2, atol=1e-5)
    # a weight that would round to 0 beside the others is refused, not silently dropped
    capsys.readouterr()
    assert main(["ensemble", str(cv_run / "r0f0"), str(cv_run / "r0f1"), "--out", str(tmp_path / "e2"),
                 "--weights", "1e-308,1e308"]) == 2
    assert "differ too much" in one_error_line(capsys.readouterr().err)


def test_a_nan_probability_makes_an_error_row_not_a_negative(nan_checkpoint, images, tmp_path, capsys):
    import pandas as pd

    out = tmp_path / "p.csv"
    # before: an empty probability cell, "Infiltration_positive" 0 and the row counted as predicted
    assert main(["predict", str(nan_checkpoint), str(images), "--out", str(out)]) == 0
    assert "0 predicted, 3 unreadable" in capsys.readouterr().out
    table = pd.read_csv(out)
    assert table["Infiltration_positive"].isna().all() and table["Atelectasis_positive"].isna().all()
    assert table["error"].str.contains("non-finite probability for image").all()
    assert table["error"].str.contains("(Infiltration = nan)", regex=False).all()
    assert main(["predict", str(nan_checkpoint), str(images), "--out", str(out), "--overwrite", "--strict"]) == 1


# ---------------------------------------------------------------------- 6. after a kill -9

SLOW_LOADER = textwrap.dedent("""
    import time, torch
    from torch.utils.data import Dataset
    from cxrlab.engine.distributed import make_loader

    class Slow(Dataset):  # a worker busy in one item, as one decoding a large image is
        def __len__(self):
            return 8

        def __getitem__(self, i):
            time.sleep(120)
            return torch.zeros(1)

    next(iter(make_loader(Slow(), 1, shuffle=False, num_workers=2, distributed=False)))
""")


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
def test_kill_9_of_a_process_with_loader_workers_leaves_no_orphans():
    from cxrlab.data.locking import pid_alive

    proc = subprocess.Popen([sys.executable, "-c", SLOW_LOADER])
    deadline = time.monotonic() + 60
    while len(_children(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) >= 2, "the loader workers did not start"
    time.sleep(1.0)  # both busy in an item
    proc.kill()
    proc.wait()
    # before: the workers lived on until their item was done (here 2 minutes; in the campaign, 6+ minutes)
    deadline = time.monotonic() + 5
    while any(pid_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [w for w in workers if pid_alive(w)]
    for pid in alive:  # clean up before failing
        os.kill(pid, 9)
    assert not alive, "loader workers outlived their parent"


def test_export_removes_the_temporary_files_of_a_killed_export(cv_run, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stale = [tmp_path / f".model.onnx.tmp-{dead.pid}", tmp_path / f".model.onnx.json.tmp-{dead.pid}"]
        running = tmp_path / f".model.onnx.tmp-{live.pid}"  # an export still at work: not ours to remove
        other = tmp_path / f".other.onnx.tmp-{dead.pid}"  # another model's
        for path in (*stale, running, other):
            path.write_bytes(b"half an ONNX file")
        # before: these stayed forever (43 MB each for a DenseNet), whatever was exported after
        assert main(["export", str(cv_run / "r0f0"), "--out", str(tmp_path / "model.onnx")]) == 0
        assert not any(p.exists() for p in stale)
        assert running.exists() and other.exists()
        assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model.onnx.json").is_file()
    finally:
        live.kill()
        live.wait()
