"""Issue 25, items 5, 7, 8 and 9: odd inputs, outputs guarded before any work, train's rules for every
command that trains, and duplicates refused for every source. One test per case of the fault campaign;
each failed on the main branch before the change."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrlab.cli import main
from cxrlab.config import load_recipe
from cxrlab.errors import CxrlabError

TINY = ["data.source=synthetic:160", "data.image_size=32", "train.epochs=1", "train.batch_size=32",
        "eval.bootstrap=0", "data.val_fraction=0.2", "data.test_fraction=0.25", "model.backbone=test_resnet"]


def error_line(capsys) -> str:
    """The one ``cxrlab: error:`` line a failed command printed (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("cxrlab: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---- item 7: the recipe loader -------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["[demo, x]", "123"])
def test_base_that_is_not_a_name_is_one_clear_line(tmp_path, base):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {base}\ntrain: {{epochs: 1}}\n")
    with pytest.raises(CxrlabError, match=r"'base' must name one recipe or YAML file .*got (list|int)"):
        load_recipe(str(recipe))


def test_yaml_alias_bomb_fails_fast_naming_the_line(tmp_path):
    # nine levels of nine aliases: 9**9 values once expanded; refused while parsing, before any expansion
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    assert recipe.stat().st_size < 1200
    with pytest.raises(CxrlabError, match=r"bomb.yaml: not valid YAML: YAML alias \*a0 is not allowed in recipes "
                                          r".* at line 2"):
        load_recipe(str(recipe))


def test_alias_in_an_override_is_refused_too():
    with pytest.raises(CxrlabError, match=r"override 'model.freeze=\[&a \[1\], \*a\]'.*alias \*a is not allowed"):
        load_recipe("demo", ["model.freeze=[&a [1], *a]"])


def test_5000_digit_integer_override_names_the_key(tmp_path, capsys):
    assert main(["train", "demo", "train.epochs=" + "9" * 5000, "--out", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert "override 'train.epochs=999" in line and "a number longer than" in line
    assert len(line) < 300
    assert not (tmp_path / "run").exists()


def test_huge_integer_is_out_of_range_naming_the_key():
    with pytest.raises(CxrlabError, match=r"config key 'train.batch_size': 1e\+30 is out of range"):
        load_recipe("demo", ["train.batch_size=1" + "0" * 30])


def test_did_you_mean_quotes_the_whole_key():
    with pytest.raises(CxrlabError, match=r"did you mean 'train.epochs'\?"):
        load_recipe("demo", ["train.epoch=3"])


# ---- item 9: duplicate rows in every source --------------------------------------------------------------

NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


def nih_file(folder: Path, rows: list[str]) -> Path:
    """A Data_Entry_2017_v2020.csv shaped like the real one (its first rows, then ``rows``)."""
    folder.mkdir(parents=True, exist_ok=True)
    real = ["00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143",
            "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143",
            "00000002_000.png,No Finding,0,2,80,M,PA,2500,2048,0.171,0.171"]
    (folder / "Data_Entry_2017_v2020.csv").write_text("\n".join([NIH_HEADER, *real, *rows]) + "\n")
    return folder


@pytest.mark.parametrize("row, differ", [
    ("00000001_001.png,Cardiomegaly|Emphysema,1,7,58,M,PA,2894,2729,0.143,0.143", "'Patient ID'"),
    ("00000001_001.png,Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143", "'Finding Labels'"),
])
def test_nih_conflicting_duplicate_is_refused_naming_the_lines(tmp_path, row, differ):
    from cxrlab.data.sources import parse_source

    root = nih_file(tmp_path / "nih", [row])
    with pytest.raises(CxrlabError, match=rf"Data_Entry_2017_v2020.csv: lines 3 and 5 list the same image "
                                          rf"'00000001_001.png' with different {differ}"):
        parse_source(f"nih:{root}")


def test_nih_exact_duplicate_warned_and_droppable(tmp_path, caplog):
    from cxrlab.data.sources import parse_source

    # the same findings in another order are the same row
    root = nih_file(tmp_path / "nih", ["00000001_001.png,Emphysema|Cardiomegaly,1,1,58,M,PA,2894,2729,0.143,0.143"])
    with caplog.at_level(logging.WARNING, logger="cxrlab"):
        assert len(parse_source(f"nih:{root}").meta) == 4
    assert "1 duplicate rows (lines 5) kept" in caplog.text
    dropped = parse_source(f"nih:{root}", duplicates="drop")
    assert list(dropped.meta["path"].str.rsplit("/", n=1).str[-1]) == ["00000001_000.png", "00000001_001.png",
                                                                      "00000002_000.png"]
    assert dropped.values[1].sum() == 2  # Cardiomegaly and Emphysema


def chexpert_valid(folder: Path, extra: list[str], shared_data: Path) -> Path:
    """valid.csv with its first three real rows, then ``extra``."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = (shared_data / "chexpert" / "valid.csv").read_text().splitlines()
    (folder / "valid.csv").write_text("\n".join(lines[:4] + extra) + "\n")
    return folder


def test_chexpert_conflicting_duplicate_is_refused_naming_the_lines(tmp_path, shared_data):
    from cxrlab.data.sources import parse_source

    line = (shared_data / "chexpert" / "valid.csv").read_text().splitlines()[2]
    changed = line.rsplit(",", 1)[0] + ",0.0"  # Support Devices 1.0 -> 0.0
    root = chexpert_valid(tmp_path / "CheXpert-v1.0-small", [changed], shared_data)
    image = line.split(",")[0]
    with pytest.raises(CxrlabError, match=rf"valid.csv: lines 3 and 5 list the same image '{image}' with "
                                          r"different 'labels'"):
        parse_source(f"chexpert:{root}")


def test_chexpert_exact_duplicate_warned_and_droppable(tmp_path, shared_data, caplog):
    from cxrlab.data.sources import parse_source

    line = (shared_data / "chexpert" / "valid.csv").read_text().splitlines()[2]
    same = line.replace(",1.0", ",1")  # 1 and 1.0 are the same label
    root = chexpert_valid(tmp_path / "CheXpert-v1.0-small", [same], shared_data)
    with caplog.at_level(logging.WARNING, logger="cxrlab"):
        assert len(parse_source(f"chexpert:{root}").meta) == 4
    assert "1 duplicate rows (lines 5) kept" in caplog.text
    assert len(parse_source(f"chexpert:{root}", duplicates="drop").meta) == 3


# ---- item 5: outputs checked before any work; heatmap goes on past unreadable images --------------------

def tiny(tmp_path: Path, head: str = "linear") -> Path:
    from test_export import tiny_checkpoint

    return tiny_checkpoint(tmp_path / f"ckpt_{head}", head, size=32)


@pytest.fixture
def pictures(tmp_path) -> Path:
    from PIL import Image

    folder = tmp_path / "pictures"
    folder.mkdir()
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(folder / "a.png")
    (folder / "b.png").write_text("not an image")
    Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 6, (40, 1))).save(folder / "c.png")
    return folder


def test_heatmap_refuses_a_folder_with_files_unless_overwrite(tmp_path, pictures, capsys):
    ckpt, out = tiny(tmp_path), tmp_path / "maps"
    assert main(["heatmap", str(ckpt), str(pictures / "a.png"), "--out", str(out), "--top", "1"]) == 0
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main(["heatmap", str(ckpt), str(pictures / "a.png"), "--out", str(out), "--top", "1"]) == 2
    assert "already exists and is not empty; pass --overwrite" in error_line(capsys)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == first  # nothing redrawn
    assert main(["heatmap", str(ckpt), str(pictures / "a.png"), "--out", str(out), "--top", "1", "--overwrite"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} != first


@pytest.mark.parametrize("top", ["-1", "0"])
def test_heatmap_top_must_be_at_least_one(tmp_path, pictures, capsys, top):
    out = tmp_path / "maps"
    assert main(["heatmap", str(tiny(tmp_path)), str(pictures / "a.png"), "--out", str(out), "--top", top]) == 2
    assert f"--top must be a whole number >= 1 (labels drawn per image), got {top}" in error_line(capsys)
    assert not out.exists()


def test_heatmap_goes_on_past_unreadable_images_and_names_them(tmp_path, pictures, capsys):
    out = tmp_path / "maps"
    assert main(["heatmap", str(tiny(tmp_path)), str(pictures), "--out", str(out), "--top", "2"]) == 0
    assert sorted(p.name.split("_")[0] for p in out.iterdir()) == ["a", "a", "c", "c"]
    printed = capsys.readouterr()
    assert f"wrote 4 heatmaps to {out}; 1 unreadable: {pictures / 'b.png'}" in printed.out
    assert "cannot read" in printed.err and "b.png" in printed.err


def test_heatmap_with_no_readable_image_exits_1_and_leaves_no_folder(tmp_path, pictures, capsys):
    out = tmp_path / "maps"
    assert main(["heatmap", str(tiny(tmp_path)), str(pictures / "b.png"), "--out", str(out)]) == 1
    assert "wrote 0 heatmaps" in capsys.readouterr().out
    assert not out.exists()


def test_prototypes_refuses_a_folder_with_files_unless_overwrite(tmp_path, capsys):
    ckpt, out = tiny(tmp_path, "prototype"), tmp_path / "proto"
    assert main(["prototypes", str(ckpt), "--out", str(out)]) == 0
    before = (out / "prototypes.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["prototypes", str(ckpt), "--out", str(out)]) == 2
    assert "prototypes folder" in error_line(capsys) and (out / "prototypes.json").stat().st_mtime_ns == before
    assert main(["prototypes", str(ckpt), "--out", str(out), "--overwrite"]) == 0


def test_prototypes_checks_out_before_loading_and_leaves_no_folder(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    # the checkpoint has the wrong head, but the output is what is checked first
    assert main(["prototypes", str(tiny(tmp_path)), "--out", str(blocker / "proto")]) == 2
    assert f"prototypes folder {blocker / 'proto'} cannot be made: {blocker} is a file" in error_line(capsys)
    assert main(["prototypes", str(tiny(tmp_path)), "--out", str(tmp_path / "proto")]) == 2
    assert "needs one trained with model.head=prototype" in error_line(capsys)
    assert not (tmp_path / "proto").exists()


def test_calibrate_out_under_a_file_fails_before_any_work(tmp_path, capsys, monkeypatch):
    import cxrlab.inference.calibrate as calibration

    def no_work(*args, **kwargs):
        raise AssertionError("predicted before checking --out")

    monkeypatch.setattr(calibration, "predict_tolerant", no_work)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["calibrate", str(tiny(tmp_path)), "--data", "synthetic:12,size=32", "--out",
                 str(blocker / "site")]) == 2
    assert f"--out {blocker / 'site'} cannot be made: {blocker} is a file" in error_line(capsys)


# ---- item 7: calibration on too few images --------------------------------------------------------------

def test_calibrate_temperature_keeps_labels_with_too_few_positives_and_names_them(tmp_path, caplog):
    from cxrlab.checkpoint import read_card
    from cxrlab.inference.calibrate import calibrate

    ckpt = tiny(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cxrlab"):
        record = calibrate(ckpt, "synthetic:4,size=32,seed=1", tmp_path / "site", temperature=True)
    assert set(record["temperature_kept"]) == {"Atelectasis", "Cardiomegaly", "Effusion"}
    assert all(v["positives"] + v["negatives"] == 4 for v in record["temperature_kept"].values())
    assert "too few to fit a temperature" in caplog.text and "Cardiomegaly (" in caplog.text
    assert read_card(tmp_path / "site").temperature == pytest.approx((1.0, 1.0, 1.0))  # not pinned at 0.05 or 20


# ---- item 8: train's rules everywhere ------------------------------------------------------------------

def test_demo_refuses_a_finished_run_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "demo" / "run"
    (run / "best").mkdir(parents=True)
    (run / "log.csv").write_text("epoch\n1\n")
    assert main(["demo", "--out", str(tmp_path / "demo"), *TINY]) == 2
    line = error_line(capsys)
    assert f"{run} already holds a run (best, log.csv); use --resume to continue it, --overwrite" in line
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["run"]  # nothing prepared


def test_demo_resume_with_nothing_to_resume_leaves_no_folder(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--resume", *TINY]) == 2
    assert "--resume: nothing to resume" in error_line(capsys)
    assert not (tmp_path / "demo").exists()


def fake_run(folder: Path, overrides: list[str]) -> Path:
    """A run folder whose last/ checkpoint was trained with ``overrides`` (only its recipe is read)."""
    (folder / "last").mkdir(parents=True)
    from cxrlab.checkpoint import FORMAT, VERSION

    info = {"format": FORMAT, "version": VERSION, "recipe": load_recipe("demo", overrides).to_dict(), "labels": ["a"]}
    (folder / "last" / "checkpoint.json").write_text(json.dumps(info))
    return folder


def test_resume_refuses_a_changed_recipe_naming_the_fields(tmp_path, capsys):
    run = fake_run(tmp_path / "run", TINY)
    assert main(["train", "demo", "--out", str(run), "--resume", *TINY, "data.image_size=64",
                 "data.source=synthetic:4000"]) == 2
    line = error_line(capsys)
    assert "the recipe differs" in line
    assert "data.image_size: 32 -> 64; data.source: 'synthetic:160' -> 'synthetic:4000'" in line


def test_resume_allows_more_epochs(tmp_path):
    from cxrlab.workflows.train import check_same_recipe

    last = fake_run(tmp_path / "run", TINY) / "last"
    with pytest.raises(CxrlabError, match=r"train.batch_size: 32 -> 16"):
        check_same_recipe(last, load_recipe("demo", TINY + ["train.batch_size=16"]))
    check_same_recipe(last, load_recipe("demo", TINY + ["train.epochs=5", "data.num_workers=2"]))


def test_ensemble_refuses_a_member_without_thresholds_unless_told(tmp_path, capsys):
    best, last = tiny(tmp_path), tmp_path / "last"
    shutil.copytree(best, last)
    info = json.loads((last / "checkpoint.json").read_text())
    del info["thresholds"]  # as a last/ checkpoint: thresholds are fitted on the selected best/ only
    (last / "checkpoint.json").write_text(json.dumps(info))
    assert main(["ensemble", str(best), str(last), "--out", str(tmp_path / "ens")]) == 2
    assert f"ensemble: {last} has no fitted thresholds" in error_line(capsys)
    assert not (tmp_path / "ens").exists()
    assert main(["ensemble", str(best), str(last), "--out", str(tmp_path / "ens"), "--missing-thresholds", "0.4"]) == 0
    fused = json.loads((tmp_path / "ens" / "checkpoint.json").read_text())["thresholds"]
    assert fused == pytest.approx([(0.3 + 0.4) / 2, (0.5 + 0.4) / 2, (0.6 + 0.4) / 2])
    assert main(["ensemble", str(best), str(last), "--out", str(tmp_path / "e2"), "--missing-thresholds", "nan"]) == 2
    assert "--missing-thresholds must be a probability between 0 and 1, got nan" in error_line(capsys)


def test_heatmap_of_an_onnx_model_says_it_needs_a_checkpoint_before_creating_anything(tmp_path, pictures, capsys):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not read")
    assert main(["heatmap", str(model), str(pictures / "a.png"), "--out", str(tmp_path / "maps")]) == 2
    assert f"heatmap needs a checkpoint (a checkpoint or run folder): {model} is an ONNX export" in error_line(capsys)
    assert not (tmp_path / "maps").exists()


@pytest.mark.parametrize("kind", ["nih", "chexpert", "mimic"])
def test_missing_data_folder_names_the_override_and_leaves_no_run_folder(tmp_path, capsys, kind):
    missing = tmp_path / "no-such-data"
    assert main(["train", "demo", "--out", str(tmp_path / "run"), *TINY, f"data.source={kind}:{missing}",
                 f"data.cache_dir={tmp_path / 'cache'}"]) == 2
    line = error_line(capsys)
    assert f"{kind}: folder not found: {missing}; point the source at your copy with data.source={kind}:<folder>" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, reason", [
    ("text", "cannot load weights for 'test_resnet' from it (not a PyTorch (torch.save) or safetensors file)"),
    ("int_keys", "not a state dict: its keys are not parameter names (e.g. 101)"),
])
def test_pretrained_file_that_is_not_a_state_dict_is_one_line_naming_it(tmp_path, capsys, content, reason):
    import torch

    weights = tmp_path / "weights.pt"
    if content == "text":
        weights.write_text("hello")  # torch.load said "KeyError: 101"
    else:
        torch.save({101: torch.zeros(3)}, weights)
    assert main(["train", "demo", "--out", str(tmp_path / "run"), *TINY, f"model.pretrained={weights}",
                 f"data.cache_dir={tmp_path / 'cache'}"]) == 2
    assert f"model.pretrained={weights}: {reason}" in error_line(capsys)
