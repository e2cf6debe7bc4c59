"""`compare --tune`: the grid, selection on validation only, reports of the choice, resuming, bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from cxrlab.cli import main
from cxrlab.errors import CxrlabError
from cxrlab.workflows.tuning import parse_grid, select, validation_score

TINY = ["data.source=synthetic:120", "data.image_size=32", "model.backbone=test_resnet", "train.epochs=1",
        "train.batch_size=32", "eval.bootstrap=0", "data.val_fraction=0.3"]
TUNE = ["--tune", "optim.lr=3e-3,1e-6", "--tune", "train.epochs=1"]


def test_select_picks_the_best_validation_score_ties_to_the_first():
    assert select([0.61, 0.74, 0.70]) == 1
    assert select([0.70, 0.74, 0.74]) == 1  # a tie goes to the earlier candidate
    assert select([None, float("nan"), 0.55, 0.52]) == 2  # an undefined score never wins
    assert select([None, float("nan")]) == 0
    assert select([0.40, 0.31, 0.35], higher_is_better=False) == 1  # train.select_on=loss


def test_grid_is_the_cartesian_product_in_the_order_given():
    grid = parse_grid(["optim.lr=1e-3, 3e-4", "train.epochs=2,4,8", "model.head_args={a: 1, b: 2},{}"])
    assert [c.id for c in grid] == [f"c{i}" for i in range(12)]
    assert grid[0].values == {"optim.lr": "1e-3", "train.epochs": "2", "model.head_args": "{a: 1, b: 2}"}
    assert grid[1].values["model.head_args"] == "{}"  # a comma inside braces belongs to the value
    assert grid[2].values == {"optim.lr": "1e-3", "train.epochs": "4", "model.head_args": "{a: 1, b: 2}"}
    assert grid[11].overrides == ["optim.lr=3e-4", "train.epochs=8", "model.head_args={}"]


@pytest.mark.parametrize("specs, message", [
    (["optim.lr"], "expected KEY=V1,V2"),
    (["=1,2"], "expected KEY=V1,V2"),
    (["optim.lr="], "no values"),
    (["optim.lr=1e-3,,3e-4"], "empty value"),
    (["optim.lr=1e-3", "optim.lr=3e-4"], "given twice"),
    (["optim.lr=1e-3,1e-3"], "listed twice"),
    (["data.image_size=32,64"], "data.*"),
])
def test_bad_grids_are_one_line_errors(specs, message):
    with pytest.raises(CxrlabError, match=message.replace("*", r"\*")) as info:
        parse_grid(specs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("tune, message", [
    ("optim.lrr=1e-3,3e-4", "did you mean"),  # the closest key
    ("train.epochs=1,two", "train.epochs"),
    ("optim.lr", "expected KEY=V1,V2"),
])
def test_bad_tune_flags_fail_before_any_training(tune, message, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "demo", "--seeds", "1", "--tune", tune, "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()  # nothing trained, not even the folder made
    # a key both set and tuned is ambiguous
    assert main(["compare", "demo", "--seeds", "1", "--tune", "train.epochs=1,2", "--out", str(out), *TINY]) == 2
    assert "both set" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A finished tiny `compare --cv 1x2 --tune` of two recipes; returns (args, out)."""
    root = tmp_path_factory.mktemp("tune")
    (root / "other.yaml").write_text("base: demo\nname: other\nloss: {bce: 1.0}\n")
    out = root / "cmp"
    args = ["compare", "demo", str(root / "other.yaml"), "--cv", "1x2", *TUNE, "--resamples", "50",
            "--out", str(out)]
    for item in TINY[:3] + TINY[4:] + [f"data.cache_dir={root / 'cache'}"]:  # train.epochs is tuned
        args += ["--set", item]
    assert main(args) == 0
    return args, out


def _candidates(out: Path, recipe: str, run: str) -> list[Path]:
    return sorted((out / recipe / run / "tune").iterdir())


def test_every_fold_trains_every_candidate_and_keeps_the_best_on_validation(tuned):
    args, out = tuned
    table = json.loads((out / "comparison.json").read_text())
    tuning = {name: table[name]["tuning"] for name in ("demo", "other")}
    # the same candidate set for every recipe
    assert tuning["demo"]["candidates"] == tuning["other"]["candidates"] == {
        "c0": {"optim.lr": "3e-3", "train.epochs": "1"}, "c1": {"optim.lr": "1e-6", "train.epochs": "1"}}
    for name, search in tuning.items():
        assert [r["run"] for r in search["runs"]] == ["r0f0", "r0f1"]
        for record in search["runs"]:
            folders = _candidates(out, name, record["run"])
            assert [f.name for f in folders] == ["c0", "c1"]
            scores = [validation_score(f)[0] for f in folders]
            assert record["val_scores"] == {"c0": scores[0], "c1": scores[1]}
            assert record["chosen"] == f"c{select(scores)}"  # the maximum of the validation scores
            # the candidate's recipe is the recipe with the override on top
            config = json.loads((folders[1] / "report" / "config.json").read_text())
            assert config["optim"]["lr"] == 1e-6 and config["name"] == name
            assert json.loads((out / name / record["run"] / "tune.json").read_text()) == record
        assert sum(search["times_chosen"].values()) == 2
        # the table reports the chosen runs' test metrics
        chosen = [json.loads((out / name / r["run"] / "tune" / r["chosen"] / "report" / "metrics.json")
                             .read_text())["macro_auc"] for r in search["runs"]]
        assert table[name]["macro_auc"]["mean"] == pytest.approx(sum(chosen) / 2)
    md = (out / "comparison.md").read_text()
    assert "Every recipe searched the same 2 candidates" in md and "selection on the validation part only" in md
    assert "| c1 | 1e-6 | 1 |" in md
    record = tuning["other"]["runs"][0]
    assert f"| {record['chosen']} (optim.lr={record['values']['optim.lr']}, train.epochs=1) |" in md
    assert "Times chosen: c0 " in md and "## Against the reference `demo`" in md


def test_the_test_part_does_not_enter_the_choice(tuned):
    """Reversing every candidate's test metrics and hiding the test predictions of the candidates left out
    changes nothing about the choice; reversing their validation scores does (so the check can fail)."""
    args, out = tuned
    before = json.loads((out / "comparison.json").read_text())
    logs = {f: f.stat().st_mtime_ns for f in out.rglob("log.csv")}
    hidden = []
    for name in ("demo", "other"):
        for record in before[name]["tuning"]["runs"]:
            for folder in _candidates(out, name, record["run"]):
                metrics_file = folder / "report" / "metrics.json"
                metrics = json.loads(metrics_file.read_text())
                metrics["macro_auc"] = 0.0 if folder.name == record["chosen"] else 1.0  # test says: the other
                metrics_file.write_text(json.dumps(metrics))
                predictions = folder / "report" / "test_predictions.csv"
                if folder.name != record["chosen"]:
                    hidden.append(predictions.rename(predictions.with_suffix(".hidden")))
                else:  # shuffled test predictions of the chosen run: the paired tests move, the choice does not
                    table = pd.read_csv(predictions)
                    table[table.columns[1:]] = table[table.columns[1:]].sample(frac=1.0, random_state=0).to_numpy()
                    table.to_csv(predictions, index=False)
    assert main(args) == 0
    after = json.loads((out / "comparison.json").read_text())
    assert {f: f.stat().st_mtime_ns for f in out.rglob("log.csv")} == logs  # nothing retrained
    for name in ("demo", "other"):
        assert after[name]["tuning"] == before[name]["tuning"]
        assert after[name]["macro_auc"]["mean"] == 0.0  # the fold results are the chosen runs' own
    for path in hidden:
        path.rename(path.with_suffix(".csv"))
    # positive control: reversing the validation scores the trainer recorded reverses the choice
    for name in ("demo", "other"):
        for record in before[name]["tuning"]["runs"]:
            for folder in _candidates(out, name, record["run"]):
                info_file = folder / "best" / "checkpoint.json"
                info = json.loads(info_file.read_text())
                info["trainer"]["score"] = 0.1 if folder.name == record["chosen"] else 0.9
                info_file.write_text(json.dumps(info))
    assert main(args) == 0
    flipped = json.loads((out / "comparison.json").read_text())
    for name in ("demo", "other"):
        for old, new in zip(before[name]["tuning"]["runs"], flipped[name]["tuning"]["runs"]):
            assert new["chosen"] != old["chosen"] and new["val_scores"][new["chosen"]] == 0.9
        assert flipped[name]["macro_auc"]["mean"] == 1.0


def test_seeds_with_tune_and_without_it(tmp_path):
    out = tmp_path / "seeds"
    common = ["--seeds", "1", "--out", str(out), *TINY[:3], *TINY[4:], f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["compare", "demo", *TUNE, *common]) == 0
    record = json.loads((out / "demo" / "seed0" / "tune.json").read_text())
    assert record["run"] == "seed0" and set(record["val_scores"]) == {"c0", "c1"}
    assert all(math.isfinite(v) for v in record["val_scores"].values())
    assert not (out / "demo" / "seed0" / "report").exists()  # the runs live under tune/
