"""The public Python API: loss classes importable and callable without a context; the verbs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cxrlab.errors import CxrlabError
from cxrlab.registry import LOSSES

# a 2×3 example whose probabilities are 1/2, 3/4 and 1/4 (logit ±ln 3): every value below is exact
LN2, LN3, LN43 = math.log(2), math.log(3), math.log(4 / 3)
LOGITS = torch.tensor([[0.0, LN3, -LN3], [LN3, 0.0, 0.0]])
TARGET = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])  # row 2's middle label is unknown


# ------------------------------------------------------------------------------------------------ losses

def test_every_registered_loss_is_importable_by_its_class_name():
    import cxrlab.losses as losses

    for name, cls in LOSSES.items():
        assert getattr(losses, cls.__name__) is cls, name
    from cxrlab.losses import ASL, BCE, Focal, LossContext, Objective, WeightedBCE  # noqa: F401
    with pytest.raises(ImportError):
        from cxrlab.losses import Nope  # noqa: F401


def test_bce_without_a_context_by_hand():
    from cxrlab.losses import BCE

    # known entries: ln 2, ln 4, ln(4/3) | ln(4/3), ln 2
    assert float(BCE()(LOGITS, TARGET, MASK)) == pytest.approx((4 * LN2 + 2 * LN43) / 5, rel=1e-6)
    # no mask: every label known, the unknown entry -log(1/2) joins the mean
    assert float(BCE()(LOGITS, TARGET)) == pytest.approx((5 * LN2 + 2 * LN43) / 6, rel=1e-6)


def test_focal_without_a_context_by_hand():
    from cxrlab.losses import Focal

    # −α y (1−p)^γ log p − (1−α)(1−y) p^γ log(1−p), γ = 2, α = 1/4:
    # row 1: ¼·¼·ln2, ¾·(9/16)·ln4, ¾·(1/16)·ln(4/3); row 2: ¼·(1/16)·ln(4/3), (unknown), ¾·¼·ln2
    expected = (LN2 / 16 + 27 * LN2 / 32 + 3 * LN43 / 64 + LN43 / 64 + 3 * LN2 / 16) / 5
    assert float(Focal()(LOGITS, TARGET, MASK)) == pytest.approx(expected, rel=1e-6)
    assert float(Focal(gamma=0.0, alpha=0.5)(LOGITS, TARGET, MASK)) == pytest.approx((4 * LN2 + 2 * LN43) / 10)


def test_asl_without_a_context_by_hand():
    from cxrlab.losses import ASL

    # −y (1−p)^γ⁺ log p − (1−y) p_m^γ⁻ log(1−p_m), p_m = max(p − m, 0); γ⁺ = 1, γ⁻ = 4, m = 0.05
    expected = (0.5 * LN2 - 0.7 ** 4 * math.log(0.3) - 0.2 ** 4 * math.log(0.8)
                + 0.25 * LN43 - 0.45 ** 4 * math.log(0.55)) / 5
    assert float(ASL()(LOGITS, TARGET, MASK)) == pytest.approx(expected, rel=1e-6)
    plain = ASL(gamma_neg=0.0, gamma_pos=0.0, margin=0.0)(LOGITS, TARGET, MASK)
    assert float(plain) == pytest.approx((4 * LN2 + 2 * LN43) / 5, rel=1e-6)  # = BCE


def test_weighted_bce_needs_frequencies_and_says_how_to_give_them():
    from cxrlab.losses import LossContext, WeightedBCE

    with pytest.raises(CxrlabError, match=r"positive frequencies.*LossContext.from_targets.*pos_weight="):
        WeightedBCE()
    # the positives of column 0 (ln 2 and ln(4/3)) count twice
    given = WeightedBCE(pos_weight=[2.0, 5.0, 7.0])(LOGITS, TARGET, MASK)
    assert float(given) == pytest.approx((5 * LN2 + 3 * LN43) / 5, rel=1e-6)
    # from the training labels: label 0 has 1 positive and 2 negatives -> weight 2, as above
    train_target = np.array([[1, 1, 0], [0, 1, 1], [0, 0, 1]], np.float32)
    ctx = LossContext.from_targets(("a", "b", "c"), train_target, np.ones_like(train_target))
    counted = WeightedBCE(ctx)
    assert counted.pos_weight.tolist() == pytest.approx([2.0, 0.5, 0.5])
    with pytest.raises(CxrlabError, match="pos_weight has 2 values for 3 labels"):
        WeightedBCE(ctx, pos_weight=[1.0, 2.0])
    with pytest.raises(CxrlabError, match="finite and > 0"):
        WeightedBCE(pos_weight=[1.0, 0.0, 1.0])


def test_registry_names_still_build_the_same_classes_in_a_recipe_objective():
    from cxrlab.losses import ASL, LossContext, Objective
    from cxrlab.output import Output

    ctx = LossContext.from_targets(("a", "b", "c"), TARGET.numpy(), MASK.numpy())
    objective = Objective({"bce": 1.0, "asl": {"weight": 0.5, "gamma_neg": 2.0}}, ctx)
    assert type(objective.terms["asl"]) is ASL and objective.terms["asl"].gamma_neg == 2.0
    total, logged = objective(Output(LOGITS), {"target": TARGET, "mask": MASK})
    direct = (torch.nn.BCEWithLogitsLoss(reduction="none")(LOGITS, TARGET) * MASK).sum() / MASK.sum()
    assert logged["bce"] == pytest.approx(float(direct), rel=1e-6)
    assert float(total) == pytest.approx(logged["bce"] + 0.5 * float(ASL(gamma_neg=2.0)(LOGITS, TARGET, MASK)))


# ------------------------------------------------------------------------------------------------- verbs

TINY = {"data.source": "synthetic:160", "data.image_size": 32, "train.epochs": 1, "train.batch_size": 32,
        "eval.bootstrap": 20, "data.val_fraction": 0.2, "data.test_fraction": 0.25}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import cxrlab

    root = tmp_path_factory.mktemp("api")
    result = cxrlab.train("demo", root / "run", **TINY, **{"data.cache_dir": root / "cache"})
    return root, result


def test_importing_cxrlab_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, cxrlab; cxrlab.train; cxrlab.api.override_args({}); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_overrides_are_the_command_lines_key_values():
    from pathlib import Path

    from cxrlab.api import override_args
    from cxrlab.config import load_recipe

    args = override_args({"train.epochs": 2, "optim.lr": 1e-5, "name": "null", "loss": {"bce": 1.0},
                          "data.views": ("PA", "AP"), "data.cache_dir": Path("/tmp/a b"), "train.ema": None,
                          "eval.bootstrap": np.int64(7)})
    assert args[:4] == ["train.epochs=2", "optim.lr=1.0e-05", "name='null'", "loss={bce: 1.0}"]
    recipe = load_recipe("demo", args)
    assert (recipe.train.epochs, recipe.optim.lr, recipe.name, recipe.loss) == (2, 1e-5, "null", {"bce": 1.0})
    assert (recipe.data.views, recipe.data.cache_dir, recipe.train.ema, recipe.eval.bootstrap) == \
        (["PA", "AP"], "/tmp/a b", None, 7)
    with pytest.raises(CxrlabError, match="not a plain value"):
        override_args({"train.epochs": object()})


def test_compare_passes_its_arguments_as_the_command_line_would(monkeypatch, tmp_path):
    import cxrlab
    from cxrlab.workflows import cross_validation

    seen = {}

    def fake_compare(recipes, out, **kwargs):
        seen.update(recipes=recipes, out=out, **kwargs)
        (out / "comparison.json").write_text('{"a": {}}')
        return out / "comparison.md", out / "comparison.json"

    monkeypatch.setattr(cross_validation, "compare", fake_compare)
    result = cxrlab.compare(["a", tmp_path / "b.yaml"], tmp_path, cv=(1, 3), tune={"optim.lr": [1e-3, 3e-4],
                            "model.freeze": [["stem", "stages.0"], []]}, **{"train.epochs": 2})
    assert seen["recipes"] == ["a", str(tmp_path / "b.yaml")] and seen["cv"] == (1, 3)
    assert seen["overrides"] == ["train.epochs=2"]
    assert seen["tune"] == ["optim.lr=0.001,0.0003", "model.freeze=[stem, stages.0],[]"]
    assert seen["paired"] == "folds"
    assert result.results == {"a": {}} and result.table == tmp_path / "comparison.json"
    cxrlab.compare(["a", "b"], tmp_path, cv=(1, 3), paired="pooled")
    assert seen["paired"] == "pooled"
    with pytest.raises(CxrlabError, match="paired='mean'"):
        cxrlab.compare(["a", "b"], tmp_path, paired="mean")


def test_train_returns_the_run_and_refuses_a_finished_one(run, tmp_path):
    import cxrlab
    from cxrlab.workflows.experiment import RunResult

    root, result = run
    assert isinstance(result, RunResult) and result.report == root / "run" / "report" / "report.md"
    assert result.report.is_file() and (result.checkpoint / "checkpoint.json").is_file()
    assert 0 <= result.metrics["macro_auc"] <= 1 and len(result.history) == 1
    with pytest.raises(CxrlabError, match="already holds a run"):
        cxrlab.train("demo", root / "run", **TINY)
    with pytest.raises(CxrlabError, match="did you mean.*epochs"):
        cxrlab.train("demo", tmp_path / "other", **{"train.epoch": 1})
    assert not (tmp_path / "other").exists()


def test_evaluate_predict_and_calibrate_a_trained_model(run, tmp_path):
    from PIL import Image

    import cxrlab

    root, result = run
    evaluation = cxrlab.evaluate(result.checkpoint, "synthetic:60", tmp_path / "eval")
    assert evaluation.report.is_file() and 0 <= evaluation.metrics["macro_auc"] <= 1

    scans = tmp_path / "scans"
    scans.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(scans / f"x{k}.png")
    (scans / "broken.png").write_bytes(b"not an image")
    predictions = cxrlab.predict(result.checkpoint, scans, tmp_path / "p.csv")
    assert predictions.csv.is_file() and len(predictions.table) == 3
    assert [p.endswith("broken.png") for p in predictions.failed] == [True]
    with pytest.raises(CxrlabError, match="exists"):
        cxrlab.predict(result.checkpoint, scans / "x0.png", tmp_path / "p.csv")

    calibrated = cxrlab.calibrate(result.checkpoint, "synthetic:60", tmp_path / "cal", temperature=True)
    assert (calibrated.checkpoint / "checkpoint.json").is_file() and calibrated.record["n"] == 60


def test_export_writes_onnx_within_its_parity_tolerance(run, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import cxrlab

    exported = cxrlab.export(run[1].checkpoint, tmp_path / "model.onnx")
    assert exported.onnx.is_file() and exported.sidecar == tmp_path / "model.onnx.json"
    assert exported.sidecar.is_file() and exported.parity["max_abs_diff"] <= exported.parity["tolerance"]
    with pytest.raises(CxrlabError, match="exists"):
        cxrlab.export(run[1].checkpoint, tmp_path / "model.onnx")
    # predicting with the export runs on ONNX Runtime alone
    import subprocess
    import sys

    from PIL import Image

    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(tmp_path / "x.png")
    code = ("import sys, cxrlab; r = cxrlab.predict(sys.argv[1], sys.argv[2], sys.argv[3]);"
            "print(len(r.table), r.failed, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(exported.onnx), str(tmp_path / "x.png"),
                          str(tmp_path / "p.csv")], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["1", "[]", "False"], out.stderr[-2000:]


@pytest.mark.slow
def test_cv_and_compare_return_their_summaries(tmp_path):
    import cxrlab

    tiny = {**TINY, "data.cache_dir": tmp_path / "cache"}
    folds = cxrlab.cv("demo", tmp_path / "cv", repeats=1, folds=2, **tiny)
    assert folds.report.is_file() and len(folds.run_dirs) == 2 and folds.metrics["macro_auc"]["n"] == 2
    (tmp_path / "focal.yaml").write_text("base: demo\nloss: {focal: 1.0}\n")
    compared = cxrlab.compare(["demo", tmp_path / "focal.yaml"], tmp_path / "cmp", seeds=1, **tiny)
    assert compared.report.is_file() and set(compared.results) == {"demo", "focal"}
    assert compared.results["focal"]["macro_auc"]["n"] == 1
    with pytest.raises(CxrlabError, match="a list of recipes"):
        cxrlab.compare("demo", tmp_path / "cmp2")
