"""Per-label decision thresholds, fitted on VALIDATION predictions only.

Fitting thresholds on the test set inflates F1 (the test set would choose its own operating point):
the caller passes validation probabilities/targets here and applies the result to the test set via
``multilabel_report(..., thresholds=...)``. A label predicted positive when ``prob >= threshold``.
"""
from __future__ import annotations

import numpy as np

from ..config import ThresholdRule, choose
from .multilabel import check_inputs, descending_counts


def f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The predicted value maximising F1 = 2tp / (tp + fp + P); ties go to the highest threshold."""
    thr, tp, fp = descending_counts(scores, labels)
    f1 = 2 * tp / (tp + fp + tp[-1])
    return float(thr[int(np.argmax(f1))])


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The predicted value maximising Youden's J = TPR − FPR on the ROC curve; ties go to the highest."""
    thr, tp, fp = descending_counts(scores, labels)
    j = tp / tp[-1] - fp / fp[-1]
    return float(thr[int(np.argmax(j))])


def fit_thresholds(probs, targets, mask=None, method: ThresholdRule | str = ThresholdRule.F1) -> np.ndarray:
    """One threshold per label from validation predictions (never the test set); 0.5 for labels
    lacking both classes among known entries. Candidates are the distinct predicted values.
    ``method``: ``f1`` or ``youden`` (:class:`cxrlab.config.ThresholdRule`).
    """
    method = choose(ThresholdRule, method, "threshold method")
    p, t, known = check_inputs(probs, targets, mask)
    pick = f1_threshold if method is ThresholdRule.F1 else youden_threshold
    out = np.full(p.shape[1], 0.5)
    for j in range(p.shape[1]):
        y = t[known[:, j], j] > 0.5
        if y.any() and not y.all():
            out[j] = pick(p[known[:, j], j], y)
    return out
