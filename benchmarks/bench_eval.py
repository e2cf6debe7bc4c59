"""Time multilabel_report on N predictions × L labels, with and without bootstrap CIs, against the
scikit-learn per-label loop, all in one run so the speed ratios compare like with like.

    OMP_NUM_THREADS=1 python benchmarks/bench_eval.py [--n 100000] [--labels 14] [--resamples 200 1000]

The sklearn bootstrap is timed on --sklearn-resamples resamples (default 10: it takes ~0.2 s per
resample) and its per-resample time is scaled to each --resamples count; the scaling is stated.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from cxrlab.metrics import multilabel_report


def make_data(n: int, labels: int, seed: int = 0):
    """Realistic-ish: prevalences 1–20 %, scores with float32 ties like model outputs."""
    rng = np.random.default_rng(seed)
    prevalence = np.linspace(0.01, 0.2, labels)
    t = (rng.random((n, labels)) < prevalence).astype(np.float64)
    logits = rng.normal(size=(n, labels)) + 1.5 * t
    p = (1 / (1 + np.exp(-logits))).astype(np.float32).astype(np.float64)
    return p, t


def sklearn_point(p, t):
    """The per-label sklearn loop a report would otherwise run."""
    aucs = [roc_auc_score(t[:, j], p[:, j]) for j in range(t.shape[1])]
    aps = [average_precision_score(t[:, j], p[:, j]) for j in range(t.shape[1])]
    return aucs, aps, f1_score(t, p >= 0.5, average=None), roc_auc_score(t.ravel(), p.ravel())


def sklearn_bootstrap(p, t, resamples, seed=0):
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, t.shape[1]))
    for b in range(resamples):
        idx = rng.integers(0, len(p), len(p))
        out[b] = [roc_auc_score(t[idx, j], p[idx, j]) for j in range(t.shape[1])]
    return out


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--labels", type=int, default=14)
    ap.add_argument("--resamples", type=int, nargs="+", default=[200, 1000])
    ap.add_argument("--sklearn-resamples", type=int, default=10)
    args = ap.parse_args()
    p, t = make_data(args.n, args.labels)
    print(f"{args.n} predictions x {args.labels} labels")

    ours, rep = timed(multilabel_report, p, t)
    ref, (aucs, _, _, micro) = timed(sklearn_point, p, t)
    assert np.allclose([rep["per_label"][f"label_{j}"]["auc"] for j in range(args.labels)], aucs, atol=1e-10)
    assert abs(rep["micro_auc"] - micro) < 1e-10
    print(f"{'no bootstrap':<26} cxrlab {ours:8.2f} s   sklearn loop {ref:8.2f} s   ratio {ref / ours:6.1f}x")

    sk_time, _ = timed(sklearn_bootstrap, p, t, args.sklearn_resamples)
    per_resample = sk_time / args.sklearn_resamples
    print(f"{'sklearn bootstrap':<26} {per_resample:.3f} s per resample (timed on {args.sklearn_resamples})")
    for b in args.resamples:
        ours_b, rep_b = timed(multilabel_report, p, t, bootstrap=b, seed=0)
        sk_b = ref + per_resample * b
        print(f"{f'bootstrap {b}':<26} cxrlab {ours_b:8.2f} s   sklearn loop ~{sk_b:7.1f} s (scaled) "
              f"ratio ~{sk_b / ours_b:6.1f}x   macro AUC {rep_b['macro_auc']:.4f} "
              f"CI [{rep_b['macro_auc_ci'][0]:.4f}, {rep_b['macro_auc_ci'][1]:.4f}]")


if __name__ == "__main__":
    main()
