"""Is predictor A better than predictor B on the same images? Paired tests of AUC and mAP differences.

- ``delong_test``: DeLong's test for correlated ROC AUCs (DeLong, DeLong & Clarke-Pearson, Biometrics
  44 (1988) 837-845), computed with the fast midrank algorithm of Sun & Xu (IEEE Signal Processing
  Letters 21 (2014) 1389-1393): O(N log N) per label instead of comparing every positive with every
  negative. Per label, and for the macro AUC difference through the covariance of all labels' AUCs.
- ``paired_bootstrap``: the macro AUC and mAP differences on image resamples drawn once and scored for
  both predictors (Efron & Tibshirani 1993, ch. 16), with a percentile CI and the two-sided p-value
  that matches it.

Both test the same labels: those with at least ``MIN_CLASS`` (2) known positives and 2 known negatives
among the scored rows (per fold in ``fold_paired_test``). DeLong's variance needs two of each, and a
label with one positive cannot be resampled honestly either: nearly every resample keeps or repeats that
one positive, so its AUC difference (often the largest of all, e.g. 0.31 vs 0.45) would pass for
certain. Labels left out are returned under ``left_out`` with their counts.

Both take an optional ``clusters`` (one id per row): rows of one cluster, e.g. the same image scored by
several runs, are resampled together and their influence is summed before squaring, so repeated
images do not pass for independent evidence. With one row per cluster both are the textbook methods.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import CxrlabError
from .multilabel import _AucPlan, _names, _percentile_ci, _row_nanmean, check_inputs


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]  # one past each tie group
    ranks = np.empty(x.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def _structural_components(scores: np.ndarray, positive: np.ndarray):
    """(AUC, V10 per positive, V01 per negative) by Sun & Xu's midranks: V10_i is the share of
    negatives scored below positive i (ties half), V01_j the share of positives scored above negative j."""
    m, n = int(positive.sum()), int((~positive).sum())
    combined = _midranks(scores)
    v10 = (combined[positive] - _midranks(scores[positive])) / n
    v01 = 1.0 - (combined[~positive] - _midranks(scores[~positive])) / m
    return float(v10.mean()), v10, v01


def _inputs(probs_a, probs_b, targets, mask, label_names, clusters):
    a, t, known = check_inputs(probs_a, targets, mask, label_names)
    b, _, _ = check_inputs(probs_b, targets, mask, label_names)  # same targets, so the same shape
    if clusters is None:
        codes = np.arange(a.shape[0])
    else:
        clusters = np.asarray(clusters)
        if clusters.shape != (a.shape[0],):
            raise CxrlabError(f"clusters must hold one id per row ({a.shape[0]}); got shape {clusters.shape}")
        codes = np.unique(clusters.astype(str), return_inverse=True)[1]
    return a, b, t > 0.5, known, _names(label_names, a.shape[1]), codes


MIN_CLASS = 2  # known positives and known negatives a label needs to be tested (DeLong's variance)


def _testable(positive: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Indices of the labels both tests score: at least MIN_CLASS known positives and negatives."""
    pos, neg = (positive & known).sum(0), (~positive & known).sum(0)
    return np.flatnonzero((pos >= MIN_CLASS) & (neg >= MIN_CLASS))


def _left_out(positive: np.ndarray, known: np.ndarray, names, tested: np.ndarray) -> dict:
    """name → {positives, negatives} of the labels not tested."""
    untested = np.setdiff1d(np.arange(len(names)), tested)
    return {names[j]: {"positives": int((positive[:, j] & known[:, j]).sum()),
                       "negatives": int((~positive[:, j] & known[:, j]).sum())} for j in untested}


def _plans(p: np.ndarray, positive: np.ndarray, known: np.ndarray, labels) -> tuple[list, list]:
    """AUC and AP plans of predictor ``p`` for the given label indices, over each label's known rows."""
    cols = {j: np.flatnonzero(known[:, j]) for j in labels}
    return ([_AucPlan(p[cols[j], j], positive[cols[j], j], cols[j]) for j in labels],
            [_ApPlan(p[cols[j], j], positive[cols[j], j], cols[j]) for j in labels])


def _p_normal(z: float) -> float:
    """Two-sided p-value of a standard normal statistic."""
    return math.erfc(abs(z) / math.sqrt(2.0)) if math.isfinite(z) else float("nan")


def _delong_parts(a, b, positive, known, names):
    """(per-label entries, rows × labels influence, usable label indices) of DeLong's test.

    influence[r, j]: row r's share of AUC_a,j − AUC_b,j's deviation, scaled so that the sum of squares
    over rows is DeLong's variance: (V10 − AUC)/sqrt(m(m−1)) for positives, likewise for negatives.
    """
    influence = np.zeros(a.shape)
    per_label, usable = {}, []
    for j, name in enumerate(names):
        rows = np.flatnonzero(known[:, j])
        y = positive[rows, j]
        m, n = int(y.sum()), int((~y).sum())
        entry = {"auc_a": float("nan"), "auc_b": float("nan"), "difference": float("nan"),
                 "se": float("nan"), "z": float("nan"), "p": float("nan"), "n_positive": m, "n_negative": n}
        if m >= 1 and n >= 1:
            auc_a, v10_a, v01_a = _structural_components(a[rows, j], y)
            auc_b, v10_b, v01_b = _structural_components(b[rows, j], y)
            entry.update(auc_a=auc_a, auc_b=auc_b, difference=auc_a - auc_b)
            if m >= 2 and n >= 2:
                influence[rows[y], j] = ((v10_a - auc_a) - (v10_b - auc_b)) / math.sqrt(m * (m - 1))
                influence[rows[~y], j] = ((v01_a - auc_a) - (v01_b - auc_b)) / math.sqrt(n * (n - 1))
                usable.append(j)
        per_label[name] = entry
    return per_label, influence, usable


def delong_test(probs_a, probs_b, targets, mask=None, label_names=None, clusters=None) -> dict:
    """DeLong's test of AUC(A) − AUC(B) on the same images, per label and for the macro AUC.

    Returns ``{"per_label": {name: {auc_a, auc_b, difference, se, z, p, n_positive, n_negative}},
    "macro": {auc_a, auc_b, difference, se, z, p, labels}}``. A label needs two known positives and two
    known negatives for a variance; other labels get NaN and are left out of the macro. The macro
    variance is wᵀSw over the 2L AUCs, S built from per-image structural components: within a label it
    is DeLong's covariance exactly; across labels the images they share carry the correlation.
    """
    a, b, positive, known, names, codes = _inputs(probs_a, probs_b, targets, mask, label_names, clusters)
    per_label, influence, usable = _delong_parts(a, b, positive, known, names)
    per_cluster = np.zeros((codes.max() + 1, a.shape[1]))
    np.add.at(per_cluster, codes, influence)
    for j in usable:
        entry = per_label[names[j]]
        entry["se"] = float(math.sqrt((per_cluster[:, j] ** 2).sum()))
        entry.update(_z_and_p(entry["difference"], entry["se"]))
    macro = {"auc_a": float("nan"), "auc_b": float("nan"), "difference": float("nan"), "se": float("nan"),
             "z": float("nan"), "p": float("nan"), "labels": [names[j] for j in usable]}
    if usable:
        macro["auc_a"] = float(np.mean([per_label[names[j]]["auc_a"] for j in usable]))
        macro["auc_b"] = float(np.mean([per_label[names[j]]["auc_b"] for j in usable]))
        macro["difference"] = macro["auc_a"] - macro["auc_b"]
        macro["se"] = float(math.sqrt((per_cluster[:, usable].mean(1) ** 2).sum()))
        macro.update(_z_and_p(macro["difference"], macro["se"]))
    return {"per_label": per_label, "macro": macro}


def _z_and_p(difference: float, se: float) -> dict:
    if se > 0:
        z = difference / se
        return {"z": z, "p": _p_normal(z)}
    # identical rankings: no variance, and no difference to test
    return {"z": 0.0, "p": 1.0} if difference == 0 else {"z": float("inf"), "p": 0.0}


class _ApPlan:
    """One label's known rows sorted by descending score, ready to score row-count vectors.

    AP = Σ_groups Δtp_g · precision_g / P over tie groups g (sklearn's step definition). Grouping the
    sum by positives instead: AP = Σ_i w_i · tp(g_i) / seen(g_i) / P, where g_i is positive i's tie
    group, tp and seen the weighted positives and rows scored at least as high as that group. Only
    one cumulative sum over all rows is needed, the rest is over positives.
    """

    def __init__(self, scores: np.ndarray, labels: np.ndarray, rows: np.ndarray):
        order = np.argsort(-scores, kind="stable")
        s, y = scores[order], labels[order].astype(bool)
        self.rows = rows[order]
        ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last position of each tie group
        group = np.repeat(np.arange(ends.size), np.diff(np.r_[-1, ends]))
        self.pos = np.flatnonzero(y)
        self.pos_group_end = ends[group[self.pos]]
        # among the positives, the last one in each positive's tie group
        self.pos_group_last = np.searchsorted(group[self.pos], group[self.pos], side="right") - 1
        self.defined = bool(y.any() and not y.all())

    def ap(self, counts: np.ndarray) -> np.ndarray:
        """AP with each row weighted by its count, for each row of ``counts``; NaN where a resample
        lacks positives or negatives."""
        if not self.defined:
            return np.full(counts.shape[0], np.nan)
        w = counts[:, self.rows]
        seen = np.cumsum(w, axis=1, dtype=np.int32)  # counts sum to the number of rows: int32 is exact
        wpos = w[:, self.pos]
        tp = np.cumsum(wpos, axis=1, dtype=np.int32)[:, self.pos_group_last].astype(np.float64)
        at = seen[:, self.pos_group_end].astype(np.float64)
        wpos = wpos.astype(np.float64)
        total, negatives = wpos.sum(1), seen[:, -1] - wpos.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(at > 0, tp / np.where(at > 0, at, 1), 0.0)
            return np.where((total > 0) & (negatives > 0), (wpos * precision).sum(1) / total, np.nan)


def paired_bootstrap(probs_a, probs_b, targets, mask=None, label_names=None, clusters=None,
                     resamples: int = 1000, ci: float = 0.95, seed: int = 0,
                     chunk_elements: int = 4_000_000) -> dict:
    """Macro AUC and mAP of A and B and their difference A − B, with a percentile CI and a two-sided
    p-value from ``resamples`` image (cluster) resamples shared by both predictors.

    p = 2·min(share of resampled differences ≤ 0, share ≥ 0), with one added to count and total so it
    is never 0, capped at 1: it is below 1 − ``ci`` exactly when the CI excludes 0. Identical predictors
    give difference 0 in every resample and p = 1. The macro averages cover the testable labels (see the
    module docstring); a label whose resample lacks a class keeps its full-set value.
    """
    a, b, positive, known, names, codes = _inputs(probs_a, probs_b, targets, mask, label_names, clusters)
    if int(resamples) < 1:
        raise CxrlabError(f"resamples must be >= 1; got {resamples}")
    if not 0 < ci < 1:
        raise CxrlabError(f"ci must be between 0 and 1 (e.g. 0.95); got {ci}")
    tested = _testable(positive, known)
    plans = {name: _plans(p, positive, known, tested) for name, p in (("a", a), ("b", b))}
    ones = np.ones((1, a.shape[0]), dtype=np.int32)
    full = {name: (_score(auc, ones, "auc")[0], _score(ap, ones, "ap")[0]) for name, (auc, ap) in plans.items()}
    observed = {name: (_nanmean(auc), _nanmean(ap)) for name, (auc, ap) in full.items()}

    n_clusters = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    diffs = np.empty((int(resamples), 2))
    chunk = max(1, min(int(resamples), chunk_elements // max(a.shape[0], 1)))
    for start in range(0, int(resamples), chunk):
        size = min(chunk, int(resamples) - start)
        drawn = np.stack([np.bincount(rng.integers(0, n_clusters, n_clusters), minlength=n_clusters)
                          for _ in range(size)]).astype(np.int32)
        if drawn.max(initial=0) <= 127:  # nearly always: int8 quarters the memory traffic of the gathers
            drawn = drawn.astype(np.int8)
        counts = drawn[:, codes]  # every row of a drawn cluster, as often as it was drawn
        for m, key in enumerate(("auc", "ap")):
            diffs[start:start + size, m] = (_fixed_macro(plans["a"][m], counts, key, full["a"][m])
                                            - _fixed_macro(plans["b"][m], counts, key, full["b"][m]))
    out = {"resamples": int(resamples), "ci": float(ci), "seed": int(seed), "n_rows": int(a.shape[0]),
           "n_clusters": n_clusters, "labels": [names[j] for j in tested],
           "left_out": _left_out(positive, known, names, tested)}
    for m, key in enumerate(("macro_auc", "map")):
        out[key] = _summary(observed["a"][m], observed["b"][m], diffs[:, m], ci)
    return out


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _fixed_macro(plans, counts: np.ndarray, key: str, full: np.ndarray) -> np.ndarray:
    """Per resample, the macro over the labels defined on the full set: a label whose resample lacks a
    class keeps its full-set value, so every resample averages the same labels as the point estimate."""
    per = _score(plans, counts, key)
    return _row_nanmean(np.where(np.isfinite(per), per, full[None, :]))


def _summary(a: float, b: float, diffs: np.ndarray, ci: float) -> dict:
    """Observed values and difference, percentile CI and two-sided bootstrap p of ``diffs``."""
    d = diffs[np.isfinite(diffs)]
    below, above = int((d <= 0).sum()), int((d >= 0).sum())
    p = min(1.0, 2.0 * (1 + min(below, above)) / (d.size + 1)) if d.size else float("nan")
    return {"a": float(a), "b": float(b), "difference": float(a - b), "ci": _percentile_ci(d, ci), "p": p}


def fold_paired_test(blocks, label_names=None, resamples: int = 1000, ci: float = 0.95, seed: int = 0,
                     chunk_elements: int = 4_000_000) -> dict:
    """Test the MEAN over folds (or seeds) of the per-fold macro AUC / mAP difference A − B: the number a
    table of per-fold means shows.

    ``blocks``: one ``(probs_a, probs_b, targets, mask, image_ids)`` per fold, A and B on the same rows.
    Each fold is scored on its own (its models' score scales never mix with another fold's); the
    difference is Δ̄ = (1/K) Σ_k Δ_k.

    - DeLong: each fold's macro AUC difference with DeLong's per-image influence (DeLong et al. 1988);
      an image's influence on Δ̄ is the sum of its per-fold influences over K, and Var Δ̄ the sum of
      squares over images. Disjoint folds give Σ_k Var Δ_k / K²; folds that test the same images (seeds)
      add their covariance instead of pretending independence.
    - Bootstrap (stratified by fold, Efron & Tibshirani 1993 §16): each resample redraws the images of
      every fold within that fold (n_k draws with replacement from fold k's n_k images); an image tested
      in several folds is redrawn within the first fold that tests it and that draw serves every fold,
      so seeds on one test set share one draw. Per fold, a label whose resample lacks a class keeps its
      full-fold value (fixed label set); Δ̄ of the resample is the mean of its per-fold differences.

    Both score, per fold, the testable labels (module docstring), so the bootstrap's observed Δ̄ and
    DeLong's are the same number. ``difference_all_labels`` is Δ̄ over every label with both classes in
    a fold (what a table of per-fold macro AUCs shows); ``left_out`` lists the labels not tested per fold.
    """
    if not blocks:
        raise CxrlabError("fold_paired_test needs at least one fold")
    if int(resamples) < 1:
        raise CxrlabError(f"resamples must be >= 1; got {resamples}")
    if not 0 < ci < 1:
        raise CxrlabError(f"ci must be between 0 and 1 (e.g. 0.95); got {ci}")
    folds, ids = [], []
    for k, (pa, pb, t, m, image_ids) in enumerate(blocks):
        a, b, positive, known, names, _ = _inputs(pa, pb, t, m, label_names, None)
        image_ids = np.asarray(image_ids).astype(str)
        if image_ids.shape != (a.shape[0],):
            raise CxrlabError(f"fold {k}: {image_ids.shape} image ids for {a.shape[0]} rows")
        folds.append((a, b, positive, known))
        ids.append(image_ids)
    codes_all = np.unique(np.concatenate(ids), return_inverse=True)[1]
    bounds = np.cumsum([0] + [len(i) for i in ids])
    codes = [codes_all[bounds[k]:bounds[k + 1]] for k in range(len(ids))]
    n_images = int(codes_all.max()) + 1
    first = np.full(n_images, -1)
    for k in reversed(range(len(codes))):
        first[codes[k]] = k
    strata = [np.flatnonzero(first == k) for k in range(len(codes)) if (first == k).any()]

    plans, full, all_labels, left_out = [], [], [], []
    delong_influence, delong_diffs, delong_labels = np.zeros(n_images), [], set()
    for k, ((a, b, positive, known), c) in enumerate(zip(folds, codes)):
        tested = _testable(positive, known)
        fold_plans = {x: _plans(p, positive, known, tested) for x, p in (("a", a), ("b", b))}
        ones = np.ones((1, a.shape[0]), dtype=np.int32)
        plans.append(fold_plans)
        full.append({x: (_score(auc, ones, "auc")[0], _score(ap, ones, "ap")[0])
                     for x, (auc, ap) in fold_plans.items()})
        # the table's number: every label with both classes in the fold, tested or not
        every = {x: [_score(plan, ones, key)[0] for plan, key in zip(_plans(p, positive, known, range(len(names))),
                                                                     ("auc", "ap"))] for x, p in (("a", a), ("b", b))}
        all_labels.append([_nanmean(every["a"][m]) - _nanmean(every["b"][m]) for m in range(2)])
        left_out += [{"fold": k, "label": name, **counts}
                     for name, counts in _left_out(positive, known, names, tested).items()]
        per_label, influence, usable = _delong_parts(a, b, positive, known, names)
        if usable:
            delong_diffs.append(float(np.mean([per_label[names[j]]["difference"] for j in usable])))
            delong_labels.update(names[j] for j in usable)
            np.add.at(delong_influence, c, influence[:, usable].mean(1))
    # folds without a testable label (tiny folds) drop out of the mean, as they do from DeLong's
    observed = [[_nanmean(np.array([_nanmean(f[x][m]) for f in full])) for x in ("a", "b")] for m in range(2)]

    rng = np.random.default_rng(seed)
    diffs = np.empty((int(resamples), 2))
    chunk = max(1, min(int(resamples), chunk_elements // max(n_images, 1)))
    for start in range(0, int(resamples), chunk):
        size = min(chunk, int(resamples) - start)
        counts = np.zeros((size, n_images), dtype=np.int32)
        for r in range(size):  # resample by resample, stratum by stratum: chunking does not change the draws
            for stratum in strata:
                counts[r] += np.bincount(stratum[rng.integers(0, stratum.size, stratum.size)], minlength=n_images)
        for m, key in enumerate(("auc", "ap")):
            per_fold = [_fixed_macro(p["a"][m], counts[:, c], key, f["a"][m])
                        - _fixed_macro(p["b"][m], counts[:, c], key, f["b"][m]) for p, f, c in zip(plans, full, codes)]
            diffs[start:start + size, m] = _row_nanmean(np.stack(per_fold, axis=1))
    out = {"resamples": int(resamples), "ci": float(ci), "seed": int(seed), "folds": len(blocks),
           "n_rows": int(bounds[-1]), "n_clusters": n_images, "left_out": left_out}
    for m, key in enumerate(("macro_auc", "map")):
        out[key] = _summary(observed[m][0], observed[m][1], diffs[:, m], ci)
        out[key]["per_fold"] = [float(_nanmean(f["a"][m]) - _nanmean(f["b"][m])) for f in full]
        out[key]["difference_all_labels"] = float(np.mean([d[m] for d in all_labels]))
    se = float(math.sqrt((delong_influence ** 2).sum())) / max(len(delong_diffs), 1)
    difference = float(np.mean(delong_diffs)) if delong_diffs else float("nan")
    test = _z_and_p(difference, se) if delong_diffs else {"z": float("nan"), "p": float("nan")}
    out["delong"] = {"difference": difference, "se": se, "folds": len(delong_diffs),
                     "labels": [n for n in names if n in delong_labels], **test}
    return out


def _score(plans, counts: np.ndarray, key: str) -> np.ndarray:
    """resamples × labels AUC or AP; NaN for labels undefined on all data or in a resample."""
    out = np.full((counts.shape[0], len(plans)), np.nan)
    for j, plan in enumerate(plans):
        if plan.defined:
            out[:, j] = plan.auc(counts) if key == "auc" else plan.ap(counts)
    return out
