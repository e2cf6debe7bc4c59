"""``cxrlab demo``: the whole flow on the embedded synthetic radiographs, in minutes on a CPU."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..config import load_recipe
from ..paths import removed_if_empty
from ..progress import plural
from .experiment import check_parts, prepare_data, run, split_rows
from .predict import predict_files
from .train import check_run_dir


def run_demo(out_dir: Path, overrides: list[str] = (), resume: bool = False, overwrite: bool = False) -> dict:
    """The demo into ``out_dir``; its run (``out_dir/run``) follows train's rules: a finished run is kept
    unless ``overwrite``, an interrupted one goes on with ``resume`` (same overrides)."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    recipe = load_recipe("demo", [f"data.cache_dir={out_dir / 'cache'}", *overrides])
    check_parts(recipe)  # a misfit head, loss or regime fails now, not after preparing the data
    with removed_if_empty(out_dir), removed_if_empty(out_dir / "run"):  # no empty folders after a failure
        check_run_dir(out_dir / "run", resume=resume, overwrite=overwrite, recipe=recipe)
        return _demo(recipe, out_dir, resume, start)


def _demo(recipe, out_dir: Path, resume: bool, start: float):
    print(f"[1/4] preparing {recipe.data.source} at {recipe.data.image_size} px")
    data = prepare_data(recipe)
    print(f"[2/4] training {recipe.model.backbone} + {recipe.model.head} head, loss {recipe.loss}, "
          f"{plural(recipe.train.epochs, 'epoch')}")
    result = run(recipe, out_dir / "run", resume=resume, data=data)
    samples, truth = _write_test_samples(recipe, data, out_dir / "samples", n=4)
    print(f"[3/4] predicting on {len(truth)} images of the run's test part (never trained or selected on), "
          f"written as PNG files to {out_dir / 'samples'}")
    predictions = predict_files(result.checkpoint, [samples], out_dir / "predictions.csv", progress=False)
    print(_prediction_lines(predictions, truth))
    metrics = result.metrics
    print("\n[4/4] test-set results (thresholds fitted on validation):\n")
    print(_auc_table(metrics))
    print(f"\npredictions for {len(predictions)} test images: {out_dir / 'predictions.csv'}")
    print(f"finished in {time.perf_counter() - start:.0f} s")
    print(f"report: {result.report}")
    return result


def _write_test_samples(recipe, data, folder: Path, n: int) -> tuple[Path, dict[str, list[str]]]:
    """The first ``n`` test images of the run's split with a finding (others if too few), as PNGs named
    ``test_<row>.png``; returns the folder and each file's true labels."""
    from PIL import Image  # lazy: start-up time (only the demo writes images)

    test = split_rows(recipe, data)["test"]  # the same split run() trained and reported on
    names = list(data.eval_labels.names)
    target = data.eval_target[:, data.eval_columns]
    ordered = sorted(test, key=lambda row: target[row].sum() == 0)  # stable: with findings first
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("test_*.png"), *folder.glob("sample_*.png")]:  # an earlier demo's (another split)
        old.unlink()
    truth = {}
    for row in ordered[:n]:
        name = f"test_{row}.png"
        Image.fromarray(np.asarray(data.images[data.image_rows[row]])).save(folder / name)
        truth[name] = [label for label, y in zip(names, target[row]) if y == 1]
    return folder, truth


def _prediction_lines(predictions, truth: dict[str, list[str]]) -> str:
    """Per image: its true labels and the labels predicted positive (at the validation-fitted thresholds)."""
    lines = []
    for _, row in predictions.iterrows():
        name = Path(row["path"]).name
        said = [c[:-len("_positive")] for c in predictions.columns if c.endswith("_positive") and row[c] == 1]
        lines.append(f"  {name:<16} true: {', '.join(truth.get(name, [])) or 'no finding':<36} "
                     f"predicted: {', '.join(said) or 'no finding'}")
    return "\n".join(lines)


def _auc_table(metrics: dict) -> str:
    rows = [f"{'label':<20} {'AUC':>6} {'95% CI':>15} {'n+':>5}"]
    unreliable = set(metrics.get("unreliable_labels") or ())
    for name, m in metrics["per_label"].items():
        auc = m.get("auc")
        ci = m.get("auc_ci") or [None, None]
        ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] is not None else ""
        flag = " † unreliable" if name in unreliable else ""
        auc_text = "–" if auc is None else f"{auc:.3f}"  # no AUC where the test part lacks a class
        rows.append(f"{name:<20} {auc_text:>6} {ci_text:>15} {m['n_positive']:>5}{flag}")
    if unreliable:
        rows.append(f"† fewer than {metrics.get('min_positives', 10)} test positives: AUC and CI carry no information")
    rows.append(f"{'macro AUC':<20} {metrics['macro_auc']:.3f}   mAP {metrics['map']:.3f}   "
                f"macro F1 {metrics['macro_f1']:.3f}")
    return "\n".join(rows)
