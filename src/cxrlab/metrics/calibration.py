"""Calibration of predicted probabilities: expected calibration error (equal-mass bins), Brier score and
the points of a reliability diagram.

- ECE (Naeini, Cooper & Hauskrecht, AAAI 2015; as used by Guo et al., "On Calibration of Modern Neural
  Networks", ICML 2017): sort the predictions, cut them into ``bins`` groups of (nearly) equal size, and
  average |mean predicted − observed frequency| over the groups weighted by their size. Equal-mass bins
  (Nixon et al., "Measuring Calibration in Deep Learning", CVPR-W 2019) keep every bin populated, which
  equal-width bins are not for rare findings whose probabilities crowd near 0. Bins hold
  ``np.array_split`` shares of the sorted predictions (sizes differ by at most one; ties may straddle a
  cut); with fewer predictions than bins, each prediction is its own bin.
- Brier score (Brier, Monthly Weather Review 78 (1950) 1-3): mean (p − y)².

Inputs are one label's known entries: probabilities in [0, 1] and 0/1 targets (callers mask first).
"""
from __future__ import annotations

import numpy as np

from ..errors import CxrlabError

DEFAULT_BINS = 10


def _pairs(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if p.shape != y.shape:
        raise CxrlabError(f"shape mismatch: {p.size} probabilities vs {y.size} labels")
    return p, y


def _check_bins(bins) -> int:
    if int(bins) != bins or int(bins) < 1:
        raise CxrlabError(f"calibration bins must be a whole number >= 1 (e.g. {DEFAULT_BINS}); got {bins}")
    return int(bins)


def reliability_bins(probs, labels, bins: int = DEFAULT_BINS) -> dict:
    """Equal-mass bins of one label: ``mean_predicted``, ``observed`` (frequency of 1) and ``count`` per
    bin, lowest predictions first (empty arrays for no predictions)."""
    p, y = _pairs(probs, labels)
    bins = _check_bins(bins)
    order = np.argsort(p, kind="stable")
    groups = [g for g in np.array_split(order, min(bins, p.size)) if g.size] if p.size else []
    return {"mean_predicted": np.array([p[g].mean() for g in groups]),
            "observed": np.array([y[g].mean() for g in groups]),
            "count": np.array([g.size for g in groups], dtype=int)}


def expected_calibration_error(probs, labels, bins: int = DEFAULT_BINS) -> float:
    """Σ_b (n_b / N) |mean p_b − mean y_b| over equal-mass bins; NaN without predictions."""
    curve = reliability_bins(probs, labels, bins)
    if curve["count"].size == 0:
        return float("nan")
    gaps = np.abs(curve["mean_predicted"] - curve["observed"])
    return float((curve["count"] * gaps).sum() / curve["count"].sum())


def brier_score(probs, labels) -> float:
    """Mean squared difference of probability and 0/1 outcome; NaN without predictions."""
    p, y = _pairs(probs, labels)
    return float(np.mean((p - y) ** 2)) if p.size else float("nan")


def label_calibration(p: np.ndarray, t: np.ndarray, known: np.ndarray, bins: int = DEFAULT_BINS):
    """(ECE per label, Brier per label) over each label's known entries (validated N×L arrays); NaN
    for a label without known entries. A label with one class present still has both."""
    ece = np.array([expected_calibration_error(p[known[:, j], j], t[known[:, j], j], bins)
                    for j in range(p.shape[1])])
    brier = np.array([brier_score(p[known[:, j], j], t[known[:, j], j]) for j in range(p.shape[1])])
    return ece, brier
