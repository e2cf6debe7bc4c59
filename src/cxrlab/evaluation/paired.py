"""Paired significance of a recipe comparison: each recipe against a reference on the same test images.

Every run writes ``report/test_predictions.csv`` (a ``path`` column, then one probability per label).
Runs are matched by position (seed s with seed s, fold (r, k) with fold (r, k)) and their predictions
aligned by path. Two tests, of two different numbers:

- ``folds`` (the default): the mean over folds (or seeds) of the per-fold macro AUC / mAP difference,
  recipe minus reference: the number comparison.md's table shows (mean of per-fold values). Each fold
  is scored on its own; the bootstrap redraws images within each fold and DeLong combines the per-fold
  variances (``metrics.significance.fold_paired_test``).
- ``pooled``: all matched runs' rows pooled into one set and scored together. An image tested in several
  runs is one cluster (DeLong sums its rows' influence, the bootstrap resamples it whole). Pooling mixes
  the score scales of different folds' models, so the pooled AUC can sit below every fold's own and
  even disagree in sign with the mean of the folds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import CxrlabError, unknown
from ..metrics.significance import delong_test, fold_paired_test, paired_bootstrap

PREDICTIONS = Path("report") / "test_predictions.csv"
PAIRED_TESTS = ("folds", "pooled")


def read_predictions(run_dir, label_names) -> pd.DataFrame:
    """A run's test predictions indexed by path, columns ``label_names`` (checked)."""
    path = Path(run_dir) / PREDICTIONS
    try:
        df = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CxrlabError(f"cannot read test predictions {path}: {exc}") from exc
    if "path" not in df.columns:
        raise CxrlabError(f"{path}: no 'path' column (columns: {', '.join(map(str, df.columns))})")
    for name in label_names:
        if name not in df.columns:
            raise unknown(f"label column in {path}", name, [c for c in df.columns if c != "path"])
    twice = df["path"].duplicated()
    if twice.any():
        raise CxrlabError(f"{path}: image {df['path'][twice].iloc[0]!r} is listed twice")
    return df.set_index("path")[list(label_names)]


def matched_blocks(runs, reference_runs, targets: pd.DataFrame, mask: pd.DataFrame) -> list[tuple]:
    """One (probs, reference probs, targets, mask, image paths) per matched pair of runs.

    ``targets``/``mask`` are indexed by image path with one column per label: the labels every run is
    scored on. A pair of runs must have tested exactly the same images.
    """
    if len(runs) != len(reference_runs):
        raise CxrlabError(f"{len(runs)} runs against {len(reference_runs)} reference runs: nothing to pair")
    names = list(targets.columns)
    blocks = []
    for run, ref in zip(runs, reference_runs):
        a, b = read_predictions(run, names), read_predictions(ref, names)
        if set(a.index) != set(b.index):
            extra = sorted(set(a.index) ^ set(b.index))[0]
            raise CxrlabError(f"{Path(run) / PREDICTIONS} and {Path(ref) / PREDICTIONS} tested different images "
                              f"(e.g. {extra!r}); a paired comparison needs identical test sets")
        missing = b.index.difference(targets.index)
        if len(missing):
            raise CxrlabError(f"{Path(ref) / PREDICTIONS}: image {missing[0]!r} is not in the labelled data")
        paths = b.index
        blocks.append((a.loc[paths].to_numpy(), b.to_numpy(), targets.loc[paths].to_numpy(),
                       mask.loc[paths].to_numpy(), paths.to_numpy()))
    return blocks


def pooled_pairs(runs, reference_runs, targets: pd.DataFrame, mask: pd.DataFrame):
    """(probs, reference probs, targets, mask, cluster ids) over all matched runs' test rows, pooled."""
    blocks = matched_blocks(runs, reference_runs, targets, mask)
    return tuple(np.concatenate([blk[i] for blk in blocks]) for i in range(5))


def paired_significance(run_dirs: dict, reference: str, targets: pd.DataFrame, mask: pd.DataFrame,
                        resamples: int = 1000, ci: float = 0.95, seed: int = 0, paired: str = "folds") -> dict:
    """recipe → macro AUC and mAP difference against ``reference`` with the paired bootstrap's CI and
    p-value and, for the macro AUC, DeLong's SE and p-value. ``paired``: ``folds`` tests the mean of the
    per-fold differences (the table's number), ``pooled`` the difference of the pooled scores (see the
    module docstring).

    ``run_dirs`` maps recipe name → its run directories in matching order (seeds or folds).
    """
    if reference not in run_dirs:
        raise unknown("reference recipe", reference, list(run_dirs))
    if paired not in PAIRED_TESTS:
        raise unknown("paired test (--paired)", paired, PAIRED_TESTS)
    names = list(targets.columns)
    out = {}
    for recipe, runs in run_dirs.items():
        if recipe == reference:
            continue
        try:
            blocks = matched_blocks(runs, run_dirs[reference], targets, mask)
        except CxrlabError as exc:  # e.g. a recipe split on other labels: its table row stands, unpaired
            out[recipe] = {"skipped": str(exc)}
            continue
        if paired == "folds":
            boot = fold_paired_test(blocks, names, resamples=resamples, ci=ci, seed=seed)
            delong = boot["delong"]
        else:
            a, b, t, m, clusters = (np.concatenate([blk[i] for blk in blocks]) for i in range(5))
            delong = delong_test(a, b, t, m, names, clusters=clusters)["macro"]
            boot = paired_bootstrap(a, b, t, m, names, clusters=clusters, resamples=resamples, ci=ci, seed=seed)
        out[recipe] = {
            "macro_auc": {"difference": boot["macro_auc"]["difference"], "ci": boot["macro_auc"]["ci"],
                          "p_bootstrap": boot["macro_auc"]["p"], "p_delong": delong["p"], "se_delong": delong["se"],
                          "recipe": boot["macro_auc"]["a"], "reference": boot["macro_auc"]["b"]},
            "map": {"difference": boot["map"]["difference"], "ci": boot["map"]["ci"],
                    "p_bootstrap": boot["map"]["p"], "recipe": boot["map"]["a"], "reference": boot["map"]["b"]},
            "runs": len(runs), "rows": int(boot["n_rows"]), "images": int(boot["n_clusters"]),
            "delong_labels": delong["labels"],  # two positives and two negatives (in some fold)
            "left_out": boot["left_out"],  # labels both tests leave out, with their counts
        }
        if paired == "folds":
            for key in ("macro_auc", "map"):
                out[recipe][key]["per_fold"] = boot[key]["per_fold"]
                out[recipe][key]["difference_all_labels"] = boot[key]["difference_all_labels"]
    return {"reference": reference, "paired": paired, "resamples": int(resamples), "ci": float(ci),
            "seed": int(seed), "recipes": out}


def _signed(x, digits: int = 4) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:+.{digits}f}"


def _p(x) -> str:
    if x is None or not np.isfinite(x):
        return "–"
    return f"{x:.2g}" if x >= 0.001 else "< 0.001"


def significance_markdown(result: dict) -> str:
    """The comparison's significance section (Markdown)."""
    ref, level = result["reference"], int(round(100 * result["ci"]))
    lines = ["", f"## Against the reference `{ref}` (paired, same test images)", "",
             *_method_lines(result, ref, level), "",
             f"| recipe | runs | images | Δ macro AUC [{level} % CI] | p DeLong | p bootstrap "
             f"| Δ mAP [{level} % CI] | p bootstrap |", "|---|---:|---:|---|---:|---:|---|---:|"]
    skipped = {recipe: r["skipped"] for recipe, r in result["recipes"].items() if "skipped" in r}
    for recipe, r in result["recipes"].items():
        if recipe in skipped:
            continue
        auc, ap = r["macro_auc"], r["map"]
        cell = {k: f"{_signed(v['difference'])} [{_signed(v['ci'][0])}, {_signed(v['ci'][1])}]"
                for k, v in (("auc", auc), ("ap", ap))}
        lines.append(f"| {recipe} | {r['runs']} | {r['images']} | {cell['auc']} | {_p(auc['p_delong'])} "
                     f"| {_p(auc['p_bootstrap'])} | {cell['ap']} | {_p(ap['p_bootstrap'])} |")
    lines += _left_out_lines(result)
    lines += [f"\nNot paired with `{ref}`: `{recipe}` ({reason})." for recipe, reason in skipped.items()]
    return "\n".join(lines) + "\n"


def _method_lines(result: dict, ref: str, level: int) -> list[str]:
    """What the section's differences are and how they were tested (``paired``: folds or pooled)."""
    if result.get("paired", "pooled") == "folds":
        return [f"Test `--paired folds` (default): differences are the MEAN over matched runs (fold by fold or "
                f"seed by seed) of each run's own macro AUC / mAP difference, recipe − {ref}: the number the "
                f"table above shows. {level} % CIs and p-values from {result['resamples']} paired bootstrap "
                "resamples that redraw images within each fold (a label lacking a class in a resample keeps its "
                "fold value); DeLong's test for the macro AUC combines the folds' variances "
                "(Var of the mean = Σ per-fold variances / K² for disjoint folds)."]
    return [f"Test `--paired pooled`: differences are recipe − {ref} of the macro AUC and mAP of all runs' test "
            f"predictions pooled into one set (runs matched seed by seed or fold by fold), which is NOT the mean "
            f"of per-fold values in the table above: pooling mixes different models' score scales. {level} % CIs "
            f"and p-values from {result['resamples']} paired bootstrap resamples of images (an image tested in "
            "several runs is resampled whole), and DeLong's test for the macro AUC with the same clustering."]


def _left_out_lines(result: dict) -> list[str]:
    """Which labels the tests left out (the same for every recipe: it depends on the labels only) and,
    in folds mode, the Δ over every label that the comparison table's means give."""
    paired = [r for r in result["recipes"].values() if "skipped" not in r]
    if not paired or not paired[0]["left_out"]:
        return []
    left = paired[0]["left_out"]
    if result.get("paired", "pooled") == "folds":
        by_label: dict[str, list[str]] = {}
        for entry in left:
            by_label.setdefault(entry["label"], []).append(f"{entry['positives']}+/{entry['negatives']}−")
        runs = paired[0]["runs"]
        where = "; ".join(f"{name} in {len(v)} of {runs} runs ({', '.join(v)})" for name, v in by_label.items())
    else:
        where = "; ".join(f"{name} ({c['positives']}+/{c['negatives']}−)" for name, c in left.items())
    lines = ["", f"Both tests score the labels with at least 2 positives and 2 negatives among the tested images "
             f"(in each fold or seed): DeLong's variance needs them, and one positive cannot be resampled honestly "
             f"(its AUC difference would pass for certain). Left out: {where}."]
    if result.get("paired", "pooled") == "folds":
        cells = ", ".join(f"`{recipe}` {_signed(r['macro_auc']['difference_all_labels'])}"
                          for recipe, r in result["recipes"].items() if "skipped" not in r)
        lines.append(f"Over every label with both classes in a fold (the table's means), Δ macro AUC is: {cells}.")
    return lines
