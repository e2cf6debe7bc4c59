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
