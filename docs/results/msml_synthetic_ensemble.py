"""Add the fusion rows to the msml_synthetic comparison: per seed, `cxrlab ensemble` of the BCE and the
BCE + MSML models; as a control, ensembles of two BCE models of neighbouring seeds (0+1, 1+2, 2+0), so
a fusion gain is not just that of averaging two models. Each is scored like every run of `cxrlab
compare` (same test part, per-label F1 thresholds fitted on the same validation part), then one table
of mean ± std over seeds for every recipe.

    python docs/results/msml_synthetic_ensemble.py runs/msml_synthetic

As a check of the scoring path, each member scored here must reproduce the macro AUC its own run
reported (printed as "check").
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

RECIPES = ["msml_synthetic_bce", "msml_synthetic_msml", "msml_synthetic_msml_corloss",
           "msml_synthetic_bilinear_unscaled", "msml_synthetic_bilinear", "msml_synthetic"]
MEMBERS = ["msml_synthetic_bce", "msml_synthetic_msml"]
METRICS = ["macro_auc", "map", "macro_f1"]


def score(checkpoint: Path, data, parts, recipe) -> dict:
    from cxrlab.inference.predictor import Predictor
    from cxrlab.metrics import fit_thresholds, multilabel_report

    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    cols = data.eval_columns
    out = {}
    for part in ("val", "test"):
        rows = parts[part]
        probs = predictor.predict_fitted(data.images[data.image_rows[rows]], batch_size=64)
        # the checkpoint's outputs, in the data's label order (an ensemble may drop "No Finding")
        order = [predictor.label_names.index(data.labels.names[c]) for c in cols]
        out[part] = (probs[:, order], data.eval_target[rows][:, cols], data.eval_mask[rows][:, cols])
    thresholds = fit_thresholds(*out["val"], method=recipe.eval.threshold)
    names = [data.labels.names[c] for c in cols]
    return multilabel_report(*out["test"], names, thresholds=thresholds)


def add_ensemble(table: dict, row: str, members: list[Path], folder: Path, data, parts, recipe) -> None:
    """Build (once) the `cxrlab ensemble` of ``members`` in ``folder``, score it and add it to ``row``."""
    from cxrlab.ensemble import build_ensemble

    if not folder.exists():
        build_ensemble(members, folder)
    metrics = score(folder, data, parts, recipe)
    print(f"{row} {folder.name}: " + ", ".join(f"{m} {metrics[m]:.4f}" for m in METRICS))
    for m in METRICS:
        table[row][m].append(metrics[m])


def main(run_dir: Path) -> None:
    from cxrlab.config import load_recipe
    from cxrlab.data.prepared import prepare_data, split_rows

    recipe = load_recipe(MEMBERS[0])
    data = prepare_data(recipe, progress=False)
    parts = split_rows(recipe, data)

    def finished(name):
        return {p.parent.parent.name for p in (run_dir / name).glob("seed*/report/metrics.json")}

    table = {name: {m: [] for m in METRICS} for name in RECIPES + ["ensemble_bce_msml", "ensemble_bce_bce"]}
    for name in RECIPES:  # every finished run (a recipe may have fewer seeds if the session ran out)
        for seed in sorted(finished(name)):
            metrics = json.loads((run_dir / name / seed / "report" / "metrics.json").read_text())
            for m in METRICS:
                table[name][m].append(metrics[m])
    for seed in sorted(finished(MEMBERS[0]) & finished(MEMBERS[1])):
        members = [run_dir / name / seed / "best" for name in MEMBERS]
        for name, member in zip(MEMBERS, members):
            own = json.loads((run_dir / name / seed / "report" / "metrics.json").read_text())["macro_auc"]
            print(f"check {name} {seed}: macro AUC {score(member, data, parts, recipe)['macro_auc']:.4f} "
                  f"here, {own:.4f} in its run")
        add_ensemble(table, "ensemble_bce_msml", members, run_dir / "ensemble_bce_msml" / seed, data, parts, recipe)
    # control: two BCE baselines of neighbouring seeds, so a fusion gain is not just that of averaging two models
    seeds = sorted(finished(MEMBERS[0]), key=lambda s: int(s[4:]))
    for i, seed in enumerate(seeds if len(seeds) > 2 else seeds[:len(seeds) - 1]):
        other = seeds[(i + 1) % len(seeds)]
        members = [run_dir / MEMBERS[0] / s / "best" for s in (seed, other)]
        add_ensemble(table, "ensemble_bce_bce", members, run_dir / "ensemble_bce_bce" / f"{seed}_{other}", data,
                     parts, recipe)
    summary = {name: {m: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"),
                          "runs": len(v)} for m, v in row.items()} for name, row in table.items() if row["macro_auc"]}
    (run_dir / "msml_with_ensemble.json").write_text(json.dumps(summary, indent=1))
    print("| recipe | runs | " + " | ".join(METRICS) + " |")
    print("|---|---:|" + "---:|" * len(METRICS))
    for name, row in summary.items():
        print(f"| {name} | {row['macro_auc']['runs']} | "
              + " | ".join(f"{row[m]['mean']:.4f} ± {row[m]['std']:.4f}" for m in METRICS) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/msml_synthetic"))
