"""Functional multi-label metrics for your own loop: numpy in, numbers out, masked entries left out.

Conventions: ``probs``, ``targets`` and ``mask`` are N×L (``mask`` 1 = known); a label without both
classes among its known entries is undefined (NaN, ``None`` in reports) and macro averages skip it.
Every function is checked against scikit-learn in the tests.
"""
from .calibration import brier_score, expected_calibration_error, reliability_bins
from .multilabel import (HEADLINE_METRICS, average_precision, binary_auc, bootstrap_auc_ci, macro_auc,
                         multilabel_report, per_label_ap, per_label_auc, per_label_f1, roc_points)
from .significance import delong_test, fold_paired_test, paired_bootstrap
from .thresholds import f1_threshold, fit_thresholds, youden_threshold

__all__ = ["HEADLINE_METRICS", "average_precision", "binary_auc", "bootstrap_auc_ci", "brier_score", "delong_test",
           "expected_calibration_error", "f1_threshold", "fit_thresholds", "fold_paired_test", "macro_auc",
           "multilabel_report", "per_label_ap", "per_label_auc", "per_label_f1", "paired_bootstrap",
           "reliability_bins", "roc_points", "youden_threshold"]
