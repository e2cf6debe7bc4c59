"""Issue 16: the faults of the reliability campaign, each reproduced, with its new behaviour.

Work lost (overwrites, resume without a checkpoint, a full disk), a hang after ``kill -9`` of prepare
(orphan workers, a stale lock), data misread (no path column, yes/no labels, duplicates), tracebacks
instead of one ``cxrlab: error:`` line, and predict with unreadable images or a damaged run folder.
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrlab.config import load_recipe
from cxrlab.cli import main
from cxrlab.errors import CxrlabError
from fakes import no_plots as _no_plots, one_error_line

TINY = ["data.source=synthetic:160", "data.image_size=32", "train.epochs=1", "train.batch_size=32",
        "eval.bootstrap=0", "data.val_fraction=0.2", "data.test_fraction=0.25"]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()




@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import cxrlab.evaluation.report as report

    root = tmp_path_factory.mktemp("rel")
    overrides = TINY + [f"data.cache_dir={root / 'cache'}"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "write_report", _no_plots)
        assert main(["train", "demo", "--out", str(root / "run"), *overrides]) == 0
    return root, overrides


@pytest.fixture(scope="module")
def images(trained):
    """Four readable PNGs and one file that is not an image."""
    from PIL import Image

    from cxrlab.data.synthetic import make_records

    root, _ = trained
    folder = root / "images"
    folder.mkdir()
    records = make_records(4, seed=3, size=32)
    for i in range(4):
        Image.fromarray((records.read(i) * 255).astype(np.uint8)).save(folder / f"ok_{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    return folder


# ------------------------------------------------------------------------------------ work lost

def test_train_refuses_a_finished_run_without_resume_or_overwrite(trained, capsys):
    root, overrides = trained
    weights = root / "run" / "best" / "model.safetensors"
    before = sha(weights)
    capsys.readouterr()
    assert main(["train", "demo", "--out", str(root / "run"), *overrides]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(root / "run") in line and "--resume" in line and "--overwrite" in line
    assert sha(weights) == before


def test_train_overwrite_replaces_the_run(trained, tmp_path, monkeypatch):
    import cxrlab.evaluation.report as report

    root, overrides = trained
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    (run / "best" / "stale.txt").write_text("from the old run")
    (run / "report" / "stale.txt").write_text("from the old run")
    monkeypatch.setattr(report, "write_report", _no_plots)
    assert main(["train", "demo", "--out", str(run), "--overwrite", *overrides]) == 0
    # old checkpoints and report removed, not mixed with the new run's
    assert not (run / "best" / "stale.txt").exists() and not (run / "report" / "stale.txt").exists()
    assert (run / "best" / "checkpoint.json").is_file() and (run / "last" / "checkpoint.json").is_file()


def test_resume_without_checkpoint_is_an_error_not_a_fresh_start(trained, tmp_path, capsys):
    root, overrides = trained
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    (run / "last" / "checkpoint.json").unlink()
    before = sha(run / "best" / "model.safetensors")
    assert main(["train", "demo", "--out", str(run), "--resume", *overrides]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "nothing to resume" in line and "last/checkpoint.json" in line
    assert sha(run / "best" / "model.safetensors") == before
    # a resume on a folder that was never a run is the same error
    assert main(["train", "demo", "--out", str(tmp_path / "new"), "--resume", *overrides]) == 2


def test_compare_reuses_only_runs_of_the_same_recipe_and_resumes_interrupted_ones(trained, tmp_path, capsys):
    root, overrides = trained
    out = tmp_path / "cmp"
    seed0 = out / "demo" / "seed0"
    shutil.copytree(root / "run", seed0)  # the demo recipe at seed 0, as compare --seeds 1 would train it
    args = ["compare", "demo", "--seeds", "1", "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    log_before, best_before = sha(seed0 / "log.csv"), sha(seed0 / "best" / "model.safetensors")
    assert main(args) == 0  # read back
    assert sha(seed0 / "log.csv") == log_before
    # another budget for the same --out: refused, naming the run and the changed field, nothing touched
    assert main(args + ["--set", "train.epochs=2"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(seed0) in line and "train.epochs: 1 → 2" in line
    assert sha(seed0 / "log.csv") == log_before
    # an interrupted run (no report yet) resumes from last/: its trained weights are kept, not retrained
    shutil.rmtree(seed0 / "report")
    assert main(args) == 0
    assert (seed0 / "report" / "metrics.json").is_file()
    assert sha(seed0 / "best" / "model.safetensors") == best_before
    shutil.rmtree(seed0 / "report")
    assert main(args + ["--set", "loss.bce=1.0"]) == 2  # the checkpoint's recipe is checked too
    assert "loss" in one_error_line(capsys.readouterr().err)


def test_predict_and_evaluate_never_overwrite_and_check_out_before_the_work(trained, images, tmp_path, capsys):
    root, _ = trained
    best = str(root / "run" / "best")
    out = tmp_path / "pred.csv"
    out.write_text("precious\n")
    assert main(["predict", best, str(images / "ok_0.png"), "--out", str(out)]) == 2
    assert "already exists" in one_error_line(capsys.readouterr().err) and out.read_text() == "precious\n"
    assert main(["predict", best, str(images / "ok_0.png"), "--out", str(out), "--overwrite"]) == 0
    assert "Effusion" in pd.read_csv(out).columns
    # --out a folder: said before any image is read (the input does not even exist)
    assert main(["predict", best, str(tmp_path / "missing.png"), "--out", str(tmp_path)]) == 2
    assert "is a folder" in one_error_line(capsys.readouterr().err)
    # evaluate: --out an existing file, or a non-empty folder, fails before the (missing) source is read
    capsys.readouterr()
    for target in (out, root / "run"):
        assert main(["evaluate", best, "--data", "csv:/nonexistent.csv", "--out", str(target)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert str(target) in line and "nonexistent" not in line


def test_unwritable_output_and_cache_folders_are_named(trained, tmp_path, capsys):
    root, overrides = trained
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["predict", str(root / "run" / "best"), str(root / "images"),
                 "--out", str(blocker / "sub" / "p.csv")]) == 2
    assert "not writable" in one_error_line(capsys.readouterr().err)
    assert main(["train", "demo", "--out", str(blocker), *overrides]) == 2
    assert "is a file" in one_error_line(capsys.readouterr().err)
    assert main(["train", "demo", "--out", str(tmp_path / "r"), *TINY, f"data.cache_dir={blocker / 'c'}"]) == 2
    assert "cache folder" in one_error_line(capsys.readouterr().err)
    if os.geteuid() != 0:  # root writes anywhere: the permission bits cannot be tested as root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(["evaluate", str(root / "run" / "best"), "--data", "synthetic:8",
                     "--out", str(locked / "e")]) == 2
        assert "not writable" in one_error_line(capsys.readouterr().err)


def test_disk_full_while_checkpointing(tmp_path, monkeypatch):
    import safetensors.torch
    import torch

    from cxrlab import checkpoint as ckpt

    from cxrlab.config import Recipe

    folder = tmp_path / "run" / "last"
    weights = {"model.w": torch.arange(6.0)}
    info = {"labels": ["a"], "recipe": Recipe().to_dict()}  # what a card is made from
    ckpt.save_checkpoint(folder, weights, {}, {}, {**info, "epoch": 1}, also=tmp_path / "run" / "best")
    before = {p.name: sha(p) for p in folder.iterdir()}
    real = safetensors.torch.save_file

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 1000)  # part of a file, then no space left
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CxrlabError, match=r"cannot write checkpoint .*last.*disk full.*previous checkpoint .* intact"):
        ckpt.save_checkpoint(folder, {"model.w": torch.zeros(6)}, {}, {}, {**info, "epoch": 2},
                             also=tmp_path / "run" / "best")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best", "last"]  # no temp folder left
    assert {p.name: sha(p) for p in folder.iterdir()} == before
    assert ckpt.read_info(folder)["epoch"] == 1
    assert torch.equal(ckpt.read_tensors(folder, ckpt.MODEL_FILE, ckpt.read_info(folder))["model.w"], weights["model.w"])
    monkeypatch.setattr(safetensors.torch, "save_file", real)


def test_disk_full_during_training_is_one_line(trained, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    root, overrides = trained

    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert main(["train", "demo", "--out", str(tmp_path / "run"), *overrides]) == 2
    assert "disk full" in one_error_line(capsys.readouterr().err)
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name]


# ------------------------------------------------------------------------------------ hang after a crash

PREPARE_SLOWLY = textwrap.dedent("""
    import sys, time
    from cxrlab.data.cache import prepare
    from cxrlab.data.synthetic import make_records

    records = make_records(160, size=32)
    render = records.reader
    def slow(i):
        time.sleep(0.03)
        return render(i)
    records.reader = slow
    prepare(records, sys.argv[1], 16, workers=2, progress=False)
""")


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
def test_kill_9_of_prepare_leaves_no_orphans_and_the_rerun_finishes(tmp_path):
    from cxrlab.data.cache import open_cache, prepare
    from cxrlab.data.locking import pid_alive
    from cxrlab.data.synthetic import make_records

    out = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", PREPARE_SLOWLY, str(out)])
    deadline = time.monotonic() + 30
    while len(_children(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) >= 2, "the decoding workers did not start"
    time.sleep(0.5)  # some chunks done
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while any(pid_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(w) for w in workers), "decoding workers outlived their parent"
    assert not (out / "cache.json").exists()  # it was interrupted

    finished = {}
    thread = threading.Thread(target=lambda: finished.update(info=prepare(make_records(160, size=32), out, 16,
                                                                           workers=1, progress=False)),
                              daemon=True)
    thread.start()
    thread.join(60)
    assert "info" in finished, "the rerun of prepare hung"
    images, _, _, info = open_cache(out)
    clean = prepare(make_records(160, size=32), tmp_path / "clean", 16, workers=1, progress=False)
    assert info.n == clean.n == 160
    np.testing.assert_array_equal(images, open_cache(clean.path)[0])


HOLD_LOCK = textwrap.dedent("""
    import fcntl, sys, time
    handle = open(sys.argv[1], "a+")
    fcntl.flock(handle, fcntl.LOCK_EX)
    handle.write(sys.argv[2] + "\\n")
    handle.flush()
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))
""")


def _hold_lock(lock: Path, content: str, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock), content, str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _prepare_in_thread(out: Path) -> dict:
    from cxrlab.data.cache import prepare
    from cxrlab.data.synthetic import make_records

    done: dict = {}
    thread = threading.Thread(target=lambda: done.update(info=prepare(make_records(20, size=32), out, 16,
                                                                       workers=1, progress=False)),
                              daemon=True)
    thread.start()
    thread.join(30)
    return done


@pytest.mark.parametrize("holder", ["dead", "pid reused"])
def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, capsys, holder):
    if holder == "dead":
        gone = subprocess.Popen(["true"])
        gone.wait()  # a pid that no longer runs: the lock's recorded holder, killed
        pid, started = gone.pid, ""
    else:  # a live process under the holder's pid, but not the one that started at the recorded time
        pid, started = os.getpid(), "1"
    out = tmp_path / "cache"
    lock = tmp_path / ".cache.lock"
    # an orphan still holds the lock file, as the workers of a killed prepare did
    orphan = _hold_lock(lock, f"{pid} {socket.gethostname()} 2026-01-01T00:00:00 {started}", 60)
    try:
        done = _prepare_in_thread(out)
    finally:
        orphan.kill()
        orphan.wait()
    assert "info" in done, "prepare waited forever on a lock whose holder is gone"
    err = capsys.readouterr().err
    assert f"taking over the lock {lock}" in err and f"process {pid}" in err
    assert done["info"].n == 20


def test_a_waiting_prepare_says_for_whom(tmp_path, capsys):
    out = tmp_path / "cache"
    lock = tmp_path / ".cache.lock"
    # a live holder (the lock's pid is the holding process itself, as prepare writes it)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.replace("sys.argv[2]", "f'{__import__(\"os\").getpid()} "
                               f"{socket.gethostname()} now'"), str(lock), "-", "1.5"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    try:
        done = _prepare_in_thread(out)
    finally:
        holder.wait()
    assert "info" in done
    err = capsys.readouterr().err
    assert f"waiting for process {holder.pid} on {socket.gethostname()}" in err and str(out) in err
    assert "taking over" not in err


def test_on_error_fail_counts_rows_from_one(tmp_path):
    from cxrlab.data.cache import prepare
    from cxrlab.data.synthetic import make_records

    records = make_records(8, size=32)
    render = records.reader

    def fifth_is_broken(i):
        if i == 4:
            raise OSError("broken file")
        return render(i)

    records.reader = fifth_is_broken
    with pytest.raises(CxrlabError, match=r"\(row 5\)"):
        prepare(records, tmp_path / "c", 16, workers=1, on_error="fail", progress=False)


# ------------------------------------------------------------------------------------ data misread

def test_csv_without_path_column_is_an_error(tmp_path):
    from cxrlab.data.sources import parse_source

    csv = tmp_path / "l.csv"
    csv.write_text("Effusion,image,Mass\n1,a.png,0\n0,b.png,1\n")
    with pytest.raises(CxrlabError, match=r"l.csv: required column 'path' is missing.*columns: Effusion, image"):
        parse_source(f"csv:{csv}")


def test_yes_no_label_column_is_an_error_naming_file_and_column(tmp_path):
    from cxrlab.data.sources import parse_source

    csv = tmp_path / "l.csv"
    csv.write_text("path,Edema,Mass,comment\na.png,yes,0,fine\nb.png,no,1,\nc.png,Yes,0,blurry\n")
    with pytest.raises(CxrlabError, match=r"l.csv: column 'Edema' holds yes/no words \(no, yes\); write labels as 1"):
        parse_source(f"csv:{csv}")
    csv.write_text("path,Edema,comment\na.png,1,fine\nb.png,0,\n")  # free text stays meta, not an error
    assert parse_source(f"csv:{csv}").labels.names == ("Edema",)


def test_duplicate_rows_warned_counted_and_droppable(tmp_path, caplog):
    from cxrlab.data.sources import parse_source

    csv = tmp_path / "l.csv"
    csv.write_text("path,patient_id,Edema\na.png,p1,1\nb.png,p2,0\na.png,p1,1\na.png,p1,1\nc.png,p3,0\n")
    with caplog.at_level("WARNING", logger="cxrlab"):
        records = parse_source(f"csv:{csv}")
    assert len(records) == 5
    assert "2 duplicate rows (lines 4, 5)" in caplog.text and "data.duplicates=drop" in caplog.text
    dropped = parse_source(f"csv:{csv}", duplicates="drop")
    assert [Path(p).name for p in dropped.meta["path"]] == ["a.png", "b.png", "c.png"]
    np.testing.assert_array_equal(dropped.values[:, 0], [1, 0, 0])


@pytest.mark.parametrize("second, differ", [("a.png,p9,1", "'patient_id'"), ("a.png,p1,0", "'Edema'")])
def test_one_image_with_two_patients_or_labels_is_an_error_naming_the_lines(tmp_path, second, differ):
    from cxrlab.data.sources import parse_source

    csv = tmp_path / "l.csv"
    csv.write_text(f"path,patient_id,Edema\nb.png,p2,0\na.png,p1,1\nc.png,p3,0\n{second}\n")
    with pytest.raises(CxrlabError, match=rf"l.csv: lines 3 and 5 list the same image 'a.png' with different {differ}"):
        parse_source(f"csv:{csv}", duplicates="drop")


# ------------------------------------------------------------------------------------ one line, exit 2

@pytest.mark.parametrize("override, expected", [
    ("train.batch_size=0", "'train.batch_size' must be an integer >= 1, got 0"),
    ("train.epochs=-1", "'train.epochs' must be an integer >= 1, got -1"),
    ("train.epochs=[1,", "override 'train.epochs=[1,': the value is not valid YAML"),
    ("=3", "override '=3' is not of the form key=value"),
    ("model.pretrained=!!python/object/apply:os.system [echo hacked]", "is not valid YAML"),
    ("optim.name=adamw2", "did you mean 'adamw'"),
    ("schedule.name=cosin", "did you mean 'cosine'"),
    ("train.amp=bf17", "did you mean 'bf16'"),
])
def test_bad_overrides_are_one_line_before_any_work(tmp_path, capsys, override, expected):
    cache = tmp_path / "cache"
    assert main(["train", "demo", "--out", str(tmp_path / "run"), *TINY, f"data.cache_dir={cache}", override]) == 2
    assert expected in one_error_line(capsys.readouterr().err)
    assert not cache.exists() and not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    with pytest.raises(CxrlabError, match="train.batch_size"):
        main(["train", "demo", "--out", str(tmp_path / "run"), "train.batch_size=0", "--debug"])
    monkeypatch.setenv("CXRLAB_DEBUG", "1")
    with pytest.raises(CxrlabError):
        main(["train", "demo", "--out", str(tmp_path / "run"), "train.batch_size=0"])


def test_unsafe_yaml_tag_in_a_base_recipe(tmp_path, capsys):
    (tmp_path / "evil_base.yaml").write_text("train: !!python/object/apply:os.system [echo hacked]\n")
    (tmp_path / "top.yaml").write_text(f"base: {tmp_path / 'evil_base.yaml'}\n")
    assert main(["train", str(tmp_path / "top.yaml"), "--out", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "evil_base.yaml (base of" in line and "not valid YAML" in line


def test_data_labels_typo_suggests_the_closest_before_preparing(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["train", "demo", "--out", str(tmp_path / "run"), *TINY, f"data.cache_dir={cache}",
                 "data.labels=[Effusion, Efusion]"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "data.labels: unknown label 'Efusion'; did you mean 'Effusion'?" in line
    assert not any(cache.rglob("images.u8"))  # checked before a single image was decoded


class _RunsCode:
    def __reduce__(self):
        return (Path.write_text, (Path(os.environ["CXRLAB_TEST_MARKER"]), "code ran"))


@pytest.mark.parametrize("kind", ["pickle", "corrupt"])
def test_pickled_or_corrupt_pretrained_file(trained, tmp_path, capsys, monkeypatch, kind):
    root, overrides = trained
    marker = tmp_path / "marker"
    monkeypatch.setenv("CXRLAB_TEST_MARKER", str(marker))
    weights = tmp_path / ("w.pth" if kind == "pickle" else "w.safetensors")
    if kind == "pickle":
        weights.write_bytes(pickle.dumps({"conv1.weight": _RunsCode()}))
    else:
        weights.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{not a safetensors header")
    assert main(["train", "demo", "--out", str(tmp_path / "run"), *overrides,
                 f"model.pretrained={weights}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    backbone = load_recipe("demo", overrides).model.backbone
    assert f"model.pretrained={weights}: cannot load weights for {backbone!r}" in line
    assert not marker.exists()  # nothing in the file was executed


def test_local_recipes_folder_replacing_a_builtin_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "demo.yaml").write_text("train: {epochs: 2}\n")
    recipe = load_recipe("demo")
    assert recipe.train.epochs == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recipes/demo.yaml" in err[0] and "replaces the built-in" in err[0]
    load_recipe("spml_an")  # a name only the built-in folder has: no note
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------ predict

def test_predict_keeps_going_past_an_unreadable_image(trained, images, tmp_path, capsys):
    root, _ = trained
    best = str(root / "run" / "best")
    out = tmp_path / "all.csv"
    assert main(["predict", best, str(images), "--out", str(out), "--batch-size", "2"]) == 0
    table = pd.read_csv(out, keep_default_na=False, na_values={"Effusion": [""]})
    assert len(table) == 5
    broken = table["path"].str.endswith("broken.png").to_numpy()
    assert table["error"][broken].iloc[0] != "" and (table["error"][~broken] == "").all()
    assert table["Effusion"][broken].isna().all() and table["Effusion"][~broken].notna().all()
    assert "broken.png" in capsys.readouterr().err
    # the readable images get exactly the predictions they get without the broken one
    good = tmp_path / "good.csv"
    assert main(["predict", best, *[str(images / f"ok_{i}.png") for i in range(4)], "--out", str(good)]) == 0
    clean = pd.read_csv(good).set_index("path")
    np.testing.assert_allclose(table[~broken].set_index("path").loc[clean.index, "Effusion"], clean["Effusion"])
    assert main(["predict", best, str(images), "--out", str(tmp_path / "strict.csv"), "--strict"]) == 1


def test_predict_on_a_run_folder_says_which_checkpoint_and_refuses_a_half_written_one(trained, images,
                                                                                     tmp_path, capsys):
    root, _ = trained
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    (run / "best" / "checkpoint.json").unlink()
    assert main(["predict", str(run), str(images / "ok_0.png"), "--out", str(tmp_path / "a.csv")]) == 2
    assert "incomplete checkpoint" in one_error_line(capsys.readouterr().err)
    shutil.rmtree(run / "best")
    assert main(["predict", str(run), str(images / "ok_0.png"), "--out", str(tmp_path / "b.csv")]) == 0
    assert f"using checkpoint {run / 'last'}" in capsys.readouterr().err
