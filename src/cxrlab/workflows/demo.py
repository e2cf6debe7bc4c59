"""``cxrlab demo``: the whole flow on the embedded synthetic radiographs, in minutes on a CPU."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..config import load_recipe
from ..paths import removed_if_empty
from .experiment import check_parts, prepare_data, run
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
          f"{recipe.train.epochs} epochs")
    result = run(recipe, out_dir / "run", resume=resume, data=data)
    print("[3/4] predicting on a few images written as PNG files")
    samples = _write_samples(data, out_dir / "samples", n=4)
    predictions = predict_files(result.checkpoint, [samples], out_dir / "predictions.csv")
    metrics = result.metrics
    print("[4/4] test-set results (thresholds fitted on validation):\n")
    print(_auc_table(metrics))
    print(f"\npredictions for {len(predictions)} images: {out_dir / 'predictions.csv'}")
    print(f"finished in {time.perf_counter() - start:.0f} s")
    print(f"report: {result.report}")
    return result


def _write_samples(data, folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.asarray(data.images[data.image_rows[-1 - i]])).save(folder / f"sample_{i}.png")
    return folder


def _auc_table(metrics: dict) -> str:
    rows = [f"{'label':<20} {'AUC':>6} {'95% CI':>15} {'n+':>5}"]
    unreliable = set(metrics.get("unreliable_labels") or ())
    for name, m in metrics["per_label"].items():
        auc = m.get("auc")
        ci = m.get("auc_ci") or [None, None]
        ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] is not None else ""
        flag = " † unreliable" if name in unreliable else ""
        rows.append(f"{name:<20} {auc if auc is None else f'{auc:.3f}':>6} {ci_text:>15} {m['n_positive']:>5}{flag}")
    if unreliable:
        rows.append(f"† fewer than {metrics.get('min_positives', 10)} test positives: AUC and CI carry no information")
    rows.append(f"{'macro AUC':<20} {metrics['macro_auc']:.3f}   mAP {metrics['map']:.3f}   "
                f"macro F1 {metrics['macro_f1']:.3f}")
    return "\n".join(rows)
