"""Multi-label metrics and bootstrap CIs (the functional core of :mod:`cxrlab.metrics`).

Conventions: masked entries (mask 0) are excluded per label; a label without both
classes among its known entries is *undefined*: its AUC/AP/F1 are NaN (``None`` in the report dict and
JSON ``null``), it is named in ``undefined_labels`` and macro averages skip it — never 0 or 0.5.

AUC is computed by Mann–Whitney counting on sorted scores (ties count one half), written so one call
scores many bootstrap resamples at once: a resample is a vector of row counts, and the AUC numerator
is a dot product of positive counts with cumulative negative counts. This matches
``sklearn.metrics.roc_auc_score`` exactly and makes 1000 bootstrap resamples of 100k × 14 take seconds.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import CxrlabError
from ..serialization import to_jsonable
from .calibration import DEFAULT_BINS, label_calibration

# the headline metrics every report and comparison shows, in this order
HEADLINE_METRICS = ("macro_auc", "micro_auc", "map", "macro_f1", "micro_f1", "macro_f1_at_0.5", "micro_f1_at_0.5")


# ----------------------------------------------------------------------------------------------------
# input checking


def _as_array(x, name: str) -> np.ndarray:
    """float64 numpy copy of a numpy array, torch tensor or nested list."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        try:
            x = x.numpy()
        except TypeError:  # bfloat16 has no numpy dtype
            x = x.float().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CxrlabError(f"{name} is not numeric: {exc}") from None


def _label(j: int, label_names) -> str:
    return f"label {label_names[j]!r}" if label_names is not None else f"label column {j}"


def check_inputs(probs, targets, mask=None, label_names=None):
    """Validated ``(probs, targets, known)`` as N×L float, N×L float, N×L bool arrays.

    Raises CxrlabError naming the problem: shape mismatch, probabilities outside [0, 1] or not finite,
    targets other than 0/1 at known entries, mask values other than 0/1. Targets at masked entries are
    ignored (they may hold -1 or NaN), which is why they are not checked.
    """
    p, t = _as_array(probs, "probabilities"), _as_array(targets, "targets")
    if p.ndim == 1 and t.ndim == 1:
        p, t = p[:, None], t[:, None]
    if p.ndim != 2 or p.shape != t.shape:
        raise CxrlabError(f"shape mismatch: probabilities {p.shape} vs targets {t.shape} (expected equal N×L)")
    if mask is None:
        known = np.ones(t.shape, dtype=bool)
    else:
        m = _as_array(mask, "mask")
        if m.ndim == 1 and t.shape[1] == 1:
            m = m[:, None]
        if m.shape != t.shape:
            raise CxrlabError(f"shape mismatch: mask {m.shape} vs targets {t.shape}")
        if not np.isin(m, (0.0, 1.0)).all():
            raise CxrlabError(f"mask must hold only 0 (unknown) and 1 (known); found {_bad_values(m, (0, 1))}")
        known = m > 0
    if label_names is not None and len(label_names) != p.shape[1]:
        raise CxrlabError(f"{len(label_names)} label names for {p.shape[1]} label columns")
    bad = ~np.isfinite(p)
    if bad.any():
        j = int(np.flatnonzero(bad.any(axis=0))[0])
        raise CxrlabError(f"probabilities contain {int(bad.sum())} NaN/inf values (first in {_label(j, label_names)})")
    out = (p < 0) | (p > 1)
    if out.any():
        j = int(np.flatnonzero(out.any(axis=0))[0])
        raise CxrlabError(f"probabilities must lie in [0, 1]; {int(out.sum())} do not (range {p.min():g}..{p.max():g},"
                          f" first in {_label(j, label_names)}); pass sigmoid(logits), not logits")
    wrong = known & ~np.isin(t, (0.0, 1.0))
    if wrong.any():
        j = int(np.flatnonzero(wrong.any(axis=0))[0])
        raise CxrlabError(f"targets must be 0 or 1 at known entries; {_label(j, label_names)} holds "
                          f"{_bad_values(t[known[:, j], j], (0, 1))} (mask uncertain/unknown entries instead)")
    return p, t, known


def _bad_values(a: np.ndarray, allowed) -> str:
    bad = np.unique(a[~np.isin(a, allowed)])
    return ", ".join(f"{v:g}" for v in bad[:5]) + (" ..." if bad.size > 5 else "")


def _names(label_names, n: int) -> list[str]:
    names = [str(x) for x in label_names] if label_names is not None else [f"label_{j}" for j in range(n)]
    if len(set(names)) != len(names):
        dup = sorted({x for x in names if names.count(x) > 1})
        raise CxrlabError(f"duplicate label names: {dup}")
    return names


def _thresholds(thresholds, n: int) -> np.ndarray:
    if thresholds is None:
        return np.full(n, 0.5)
    thr = _as_array(thresholds, "thresholds")
    thr = np.full(n, float(thr)) if thr.ndim == 0 else thr.ravel()
    if thr.size != n or not np.isfinite(thr).all():
        raise CxrlabError(f"thresholds must be {n} finite numbers (one per label); got {thr.size}")
    return thr


# ----------------------------------------------------------------------------------------------------
# AUC (Mann–Whitney on counts) and AP


class _AucPlan:
    """One label's known rows split by class, negatives sorted by score, ready to score row-count vectors.

    For each positive, ``below``/``upto`` are the numbers of negatives scoring strictly less / at most as
    much; with cumulative negative counts ``C`` the doubled Mann–Whitney numerator is
    Σ_pos w_i (C[below_i] + C[upto_i]) — a tie counts half, as in sklearn.
    """

    def __init__(self, scores: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None):
        rows = np.arange(scores.size) if rows is None else rows
        pos = labels > 0.5
        neg_order = np.argsort(scores[~pos], kind="stable")
        neg_scores = scores[~pos][neg_order]
        self.neg_rows = rows[~pos][neg_order]
        self.pos_rows = rows[pos]
        self.below = np.searchsorted(neg_scores, scores[pos], side="left")
        self.upto = np.searchsorted(neg_scores, scores[pos], side="right")

    @property
    def defined(self) -> bool:
        return self.pos_rows.size > 0 and self.neg_rows.size > 0

    def auc(self, counts: np.ndarray | None = None) -> np.ndarray:
        """AUC for each row of ``counts`` (resamples × rows); ``None`` means every row once."""
        if not self.defined:
            return np.full(1 if counts is None else counts.shape[0], np.nan)
        if counts is None:
            cum = np.arange(self.neg_rows.size + 1, dtype=np.float64)[None, :]
            wpos = np.ones((1, self.pos_rows.size))
        else:
            cum = np.zeros((counts.shape[0], self.neg_rows.size + 1), dtype=np.int32)
            np.cumsum(counts[:, self.neg_rows], axis=1, dtype=np.int32, out=cum[:, 1:])
            wpos = counts[:, self.pos_rows].astype(np.float64)
        pairs = (cum[:, self.below] + cum[:, self.upto]).astype(np.float64)
        numerator = np.einsum("ij,ij->i", wpos, pairs)
        n_pos, n_neg = wpos.sum(axis=1, dtype=np.float64), cum[:, -1].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where((n_pos > 0) & (n_neg > 0), numerator / (2.0 * n_pos * n_neg), np.nan)


def binary_auc(scores, labels) -> float:
    """ROC AUC of one label (ties count half); NaN without both classes."""
    s, y = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels, dtype=np.float64).ravel()
    return float(_AucPlan(s, y).auc()[0])


def descending_counts(scores, labels):
    """(thresholds, tp, fp) for predicting ``score >= threshold`` at each distinct score, highest first.

    The shared basis of AP, ROC curves and threshold search: one sort, cumulative counts at the last
    row of each tie group.
    """
    s, y = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel() > 0.5
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) if s.size else np.array([], dtype=int)
    tp = np.cumsum(y)[ends]
    return s[ends], tp, ends + 1 - tp


def average_precision(scores, labels) -> float:
    """AP = Σ (R_k − R_{k−1}) P_k over distinct thresholds (sklearn's definition); NaN without both classes."""
    y = np.asarray(labels).ravel() > 0.5
    if y.all() or not y.any():
        return float("nan")
    _, tp, fp = descending_counts(scores, y)
    recall_step = np.diff(tp, prepend=0) / tp[-1]
    return float(np.sum(recall_step * tp / (tp + fp)))


def roc_points(scores, labels):
    """(fpr, tpr, thresholds) starting at (0, 0) with threshold +inf, like sklearn's roc_curve (all points)."""
    thr, tp, fp = descending_counts(scores, labels)
    n_pos, n_neg = (tp[-1], fp[-1]) if tp.size else (0, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.r_[0, tp] / n_pos
        fpr = np.r_[0, fp] / n_neg
    return fpr, tpr, np.r_[np.inf, thr]


def macro_auc(probs, targets, mask=None) -> float:
    """Mean ROC AUC over labels with both classes among known entries; NaN if none has. For model selection."""
    p, t, known = check_inputs(probs, targets, mask)
    aucs = np.array([_AucPlan(p[known[:, j], j], t[known[:, j], j]).auc()[0] for j in range(p.shape[1])])
    return _nanmean(aucs)


def _nanmean(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


# ----------------------------------------------------------------------------------------------------
# thresholded metrics


def _confusion(p: np.ndarray, t: np.ndarray, known: np.ndarray, thr: np.ndarray) -> dict[str, np.ndarray]:
    """Per-label tp/fp/fn/tn over known entries, predicting positive where ``p >= threshold``."""
    pred = p >= thr[None, :]
    pos, neg = known & (t > 0.5), known & (t < 0.5)
    return {"tp": (pred & pos).sum(0), "fp": (pred & neg).sum(0), "fn": (~pred & pos).sum(0),
            "tn": (~pred & neg).sum(0)}


def _ratio(num, den) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _f1(c: dict) -> np.ndarray:
    """F1 = 2tp / (2tp + fp + fn); 0 when nothing is positive or predicted (sklearn's zero_division=0)."""
    den = 2 * c["tp"] + c["fp"] + c["fn"]
    return np.nan_to_num(_ratio(2 * c["tp"], den), nan=0.0)


def _micro_f1(c: dict) -> float:
    tp, fp, fn = (int(c[k].sum()) for k in ("tp", "fp", "fn"))
    return 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0


# ----------------------------------------------------------------------------------------------------
# bootstrap


def bootstrap_aucs(plans: Sequence[_AucPlan], n_rows: int, resamples: int, seed: int = 0,
                   chunk_elements: int = 2_000_000) -> np.ndarray:
    """resamples × labels AUCs on images (rows) drawn with replacement; NaN where a resample lacks a class.

    Resamples are drawn one after another from one seeded generator, so the result does not depend on
    ``chunk_elements`` (which only bounds memory).
    """
    rng = np.random.default_rng(seed)
    out = np.full((resamples, len(plans)), np.nan)
    chunk = max(1, min(resamples, chunk_elements // max(n_rows, 1)))
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        counts = np.empty((b, n_rows), dtype=np.int32)
        for k in range(b):
            counts[k] = np.bincount(rng.integers(0, n_rows, n_rows), minlength=n_rows)
        if counts.max(initial=0) <= 127:  # nearly always: int8 halves the memory traffic of the gathers
            counts = counts.astype(np.int8)
        for j, plan in enumerate(plans):
            if plan.defined:
                out[start:start + b, j] = plan.auc(counts)
    return out


def _percentile_ci(values: np.ndarray, ci: float) -> list:
    """Percentile interval ignoring NaN resamples; [None, None] when none is finite."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return [None, None]
    lo, hi = np.percentile(values, [50 * (1 - ci), 50 * (1 + ci)])
    return [float(lo), float(hi)]


# ----------------------------------------------------------------------------------------------------
# the report


def multilabel_report(probabilities, targets, mask=None, label_names=None, thresholds=None,
                      bootstrap: int = 0, ci: float = 0.95, seed: int = 0, min_positives: int = 0,
                      exclude_unreliable: bool = False, calibration_bins: int = DEFAULT_BINS) -> dict:
    """The metrics.json dict: headline metrics, per-label metrics and (with ``bootstrap`` > 0) AUC CIs.

    ``thresholds`` (one per label, e.g. from ``fit_thresholds`` on *validation* data) set ``f1``,
    ``macro_f1``, ``micro_f1``, sensitivity and specificity; ``*_at_0.5`` are always at 0.5.
    A defined label with fewer than ``min_positives`` known positives is listed in ``unreliable_labels``
    (its AUC and CI rest on a handful of images); ``exclude_unreliable`` leaves such labels out of the
    macro averages (micro averages pool entries and keep them). Undefined values are ``None`` so the
    dict is exactly what JSON holds.

    Bootstrap CIs resample images with replacement (percentile intervals). The macro AUC's CI is over a
    fixed label set: in a resample where a label lacks positives or negatives, that label keeps its AUC
    on the full set, so every resample averages exactly the labels of the point estimate. A per-label CI
    uses only the resamples in which that label has both classes.

    Calibration (``metrics.calibration``): per-label ``ece`` (``calibration_bins`` equal-mass bins) and
    ``brier`` over the label's known entries, and their means over labels with known entries,
    ``mean_ece`` and ``mean_brier`` (the bin count is under ``calibration``).
    """
    p, t, known = check_inputs(probabilities, targets, mask, label_names)
    names = _names(label_names, p.shape[1])
    thr = _thresholds(thresholds, p.shape[1])
    if not 0 < ci < 1:
        raise CxrlabError(f"ci must be between 0 and 1 (e.g. 0.95); got {ci}")
    if int(bootstrap) < 0:
        raise CxrlabError(f"bootstrap must be a number of resamples >= 0; got {bootstrap}")
    plans = [_AucPlan(p[known[:, j], j], t[known[:, j], j], np.flatnonzero(known[:, j])) for j in range(len(names))]
    defined = np.array([pl.defined for pl in plans])
    auc = np.array([pl.auc()[0] for pl in plans])
    ap = np.array([average_precision(p[known[:, j], j], t[known[:, j], j]) if defined[j] else np.nan
                   for j in range(len(names))])
    c_thr, c_half = _confusion(p, t, known, thr), _confusion(p, t, known, np.full(len(names), 0.5))
    f1 = np.where(defined, _f1(c_thr), np.nan)
    f1_half = np.where(defined, _f1(c_half), np.nan)
    unreliable = defined & ((c_thr["tp"] + c_thr["fn"]) < int(min_positives))
    ece, brier = label_calibration(p, t, known, calibration_bins)
    in_macro = defined & ~unreliable if exclude_unreliable else defined
    report = {
        "macro_auc": _nanmean(auc[in_macro]),
        "micro_auc": float(_AucPlan(p[known], t[known]).auc()[0]),
        "map": _nanmean(ap[in_macro]),
        "macro_f1": _nanmean(f1[in_macro]),
        "micro_f1": _micro_f1(c_thr),
        "macro_f1_at_0.5": _nanmean(f1_half[in_macro]),
        "micro_f1_at_0.5": _micro_f1(c_half),
        "undefined_labels": [n for n, d in zip(names, defined) if not d],
        "unreliable_labels": [n for n, u in zip(names, unreliable) if u],
        "min_positives": int(min_positives),
        "macro_excludes_unreliable": bool(exclude_unreliable),
        "mean_ece": _nanmean(ece),
        "mean_brier": _nanmean(brier),
        "calibration": {"bins": int(calibration_bins), "binning": "equal-mass"},
        "n_images": int(p.shape[0]),
        "threshold_source": "default 0.5" if thresholds is None else "given per label",
    }
    per_label = {}
    for j, name in enumerate(names):
        per_label[name] = {
            "auc": auc[j], "ap": ap[j], "f1": f1[j], "threshold": thr[j],
            "n_positive": int(c_thr["tp"][j] + c_thr["fn"][j]), "n_negative": int(c_thr["tn"][j] + c_thr["fp"][j]),
            "sensitivity": _ratio(c_thr["tp"][j], c_thr["tp"][j] + c_thr["fn"][j]),
            "specificity": _ratio(c_thr["tn"][j], c_thr["tn"][j] + c_thr["fp"][j]),
            "f1_at_0.5": f1_half[j], "reliable": bool(defined[j] and not unreliable[j]),
            "ece": ece[j], "brier": brier[j],
        }
    if bootstrap:
        boot = bootstrap_aucs(plans, p.shape[0], int(bootstrap), seed)
        report["macro_auc_ci"] = _percentile_ci(fixed_label_macro(boot[:, in_macro], auc[in_macro]), ci)
        for j, name in enumerate(names):
            per_label[name]["auc_ci"] = _percentile_ci(boot[:, j], ci)
        report["bootstrap"] = {"resamples": int(bootstrap), "ci": float(ci), "seed": int(seed)}
    report["per_label"] = per_label
    return to_jsonable(report)


def fixed_label_macro(boot: np.ndarray, full: np.ndarray) -> np.ndarray:
    """Per resample, the mean over the same labels as the point estimate: a label whose resample lacks a
    class (NaN) takes its full-set value ``full``. Without this, a rare label that loses its only
    positive drops out of some resamples, those resamples average fewer labels, and the interval mixes
    label sets (it can exclude its own point estimate)."""
    return _row_nanmean(np.where(np.isfinite(boot), boot, np.asarray(full, dtype=np.float64)[None, :]))


def _row_nanmean(a: np.ndarray) -> np.ndarray:
    if a.shape[1] == 0:
        return np.full(a.shape[0], np.nan)
    finite = np.isfinite(a)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite.any(1), np.nansum(a, 1) / finite.sum(1), np.nan)


# ----------------------------------------------------------------------------------------------------
# per-label functional forms (what a researcher's own loop calls; masked entries are left out)


def per_label_auc(probs, targets, mask=None) -> np.ndarray:
    """ROC AUC of each label over its known entries (NaN where a label lacks a class)."""
    p, t, known = check_inputs(probs, targets, mask)
    return np.array([_AucPlan(p[known[:, j], j], t[known[:, j], j]).auc()[0] for j in range(p.shape[1])])


def per_label_ap(probs, targets, mask=None) -> np.ndarray:
    """Average precision of each label over its known entries (NaN where a label lacks a class)."""
    p, t, known = check_inputs(probs, targets, mask)
    return np.array([average_precision(p[known[:, j], j], t[known[:, j], j]) for j in range(p.shape[1])])


def per_label_f1(probs, targets, mask=None, thresholds=None) -> np.ndarray:
    """F1 of each label at ``thresholds`` (default 0.5) over its known entries."""
    p, t, known = check_inputs(probs, targets, mask)
    return _f1(_confusion(p, t, known, _thresholds(thresholds, p.shape[1])))


def bootstrap_auc_ci(probs, targets, mask=None, resamples: int = 1000, ci: float = 0.95,
                     seed: int = 0) -> tuple[list, np.ndarray]:
    """(macro-AUC interval, L×2 per-label intervals) from image-level bootstrap resamples."""
    p, t, known = check_inputs(probs, targets, mask)
    plans = [_AucPlan(p[known[:, j], j], t[known[:, j], j], np.flatnonzero(known[:, j])) for j in range(p.shape[1])]
    boot = bootstrap_aucs(plans, p.shape[0], int(resamples), seed)
    defined = np.array([pl.defined for pl in plans])
    full = np.array([pl.auc()[0] for pl in plans])
    per_label = np.array([[np.nan if v is None else v for v in _percentile_ci(boot[:, j], ci)]
                          for j in range(p.shape[1])])
    return _percentile_ci(fixed_label_macro(boot[:, defined], full[defined]), ci), per_label
