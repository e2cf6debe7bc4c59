"""Split-balance benchmark on the real NIH and CheXpert label files: greedy patient assignment
(``cxrlab.data.splits``) against a random patient-grouped split.

Per repeat (R×K folds, seed S): the worst relative deviation of a fold's per-label image prevalence
from the overall prevalence (labels with ≥ 1,000 positive images), the worst fold-size deviation, and
the time taken; then how different the repeats are (share of patient pairs that share a fold in one
repeat and still share it in the next; 1/K for independent repeats, 1.0 for identical ones) and
``random_split`` (train/val/test 0.7/0.1/0.2). CheXpert positives are the raw 1.0 entries (uncertain
-1.0 is not positive) and, second, the ``u_ones`` policy (uncertain counts as positive).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_splits.py [--folds 5] [--repeats 3] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from cxrlab.data.sources import parse_source
from cxrlab.data.splits import fold_balance, random_split, repeated_kfold

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def random_grouped_folds(patients: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Baseline: each patient to a uniformly random fold."""
    uniques, codes = np.unique(patients.astype(str), return_inverse=True)
    return np.random.default_rng(seed).integers(0, folds, len(uniques))[codes]


def same_fold_kept(a: np.ndarray, b: np.ndarray, folds: int) -> float:
    """P(same fold in b | same fold in a) over pairs of rows, from the fold contingency table."""
    table = np.zeros((folds, folds))
    np.add.at(table, (a, b), 1)
    pairs_a = (table.sum(1) ** 2).sum()
    return float((table ** 2).sum() / pairs_a)


def bench(name: str, records, positives: np.ndarray, folds: int, repeats: int, seed: int) -> None:
    names = records.labels.names
    patients = records.meta["patient_id"].to_numpy(dtype=object)
    print(f"\n{name}: {len(records):,} images, {len(np.unique(patients.astype(str))):,} patients, "
          f"{int((positives.sum(0) >= 1000).sum())} labels with >= 1000 positive images")
    start = time.perf_counter()
    manifest = repeated_kfold(records, target=positives, folds=folds, repeats=repeats, seed=seed)
    greedy_s = time.perf_counter() - start
    print(f"{'repeat':>6}  {'greedy worst prev. dev':>22}  {'size dev':>8}  {'random worst prev. dev':>22}  {'size dev':>8}")
    fold_of = []
    for r in range(repeats):
        fold = manifest["fold"].to_numpy()[manifest["repeat"].to_numpy() == r]
        fold_of.append(fold)
        g = fold_balance(fold, positives, label_names=names)
        b = fold_balance(random_grouped_folds(patients, folds, seed + r), positives, label_names=names)
        print(f"{r:>6}  {100 * g['worst_prevalence_deviation']:>9.2f} % ({g['worst_label']:<12})"
              f"  {100 * g['worst_size_deviation']:>6.2f} %  {100 * b['worst_prevalence_deviation']:>9.2f} % "
              f"({b['worst_label']:<12})  {100 * b['worst_size_deviation']:>6.2f} %")
    print(f"greedy: {greedy_s:.2f} s for {repeats} x {folds} folds")
    kept = [same_fold_kept(fold_of[r], fold_of[r + 1], folds) for r in range(repeats - 1)]
    print("same-fold pairs kept between consecutive repeats: "
          + ", ".join(f"{k:.3f}" for k in kept) + f" (independent: {1 / folds:.3f}, identical: 1.000)")
    start = time.perf_counter()
    parts = random_split(patients, positives, val_fraction=0.1, test_fraction=0.2, seed=seed)
    split_s = time.perf_counter() - start
    part = np.empty(len(records), dtype=np.int64)
    for k, rows in enumerate(parts.values()):
        part[rows] = k
    s = fold_balance(part, positives, ratios=[0.7, 0.1, 0.2], label_names=names)
    print(f"random_split 0.7/0.1/0.2: worst prev. dev {100 * s['worst_prevalence_deviation']:.2f} % "
          f"({s['worst_label']}), size dev {100 * s['worst_size_deviation']:.2f} %, {split_s:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    nih = parse_source(f"nih:{SHARED / 'nih'}")
    bench("NIH", nih, nih.values == 1, args.folds, args.repeats, args.seed)
    with tempfile.TemporaryDirectory() as root:
        os.symlink(SHARED / "chexpert" / "chexpert_train.csv.gz", Path(root) / "train.csv.gz")
        chexpert = parse_source(f"chexpert:{root}")
        bench("CheXpert (positives = 1.0)", chexpert, chexpert.values == 1, args.folds, args.repeats, args.seed)
        bench("CheXpert (u_ones: 1.0 or -1.0)", chexpert, np.isin(chexpert.values, (1, -1)), args.folds,
              args.repeats, args.seed)


if __name__ == "__main__":
    main()
