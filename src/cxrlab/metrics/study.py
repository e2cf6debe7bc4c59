"""Study-level evaluation: one prediction and one label set per study, as the field scores CheXpert and MIMIC.

Radiologists label a study, not an image: CheXpert's valid.csv repeats each study's labels on every image
of it (200 studies, 234 images), MIMIC-CXR gives labels per study, and the CheXpert competition scores one
prediction per study. Irvin et al. (AAAI 2019, "CheXpert", section Model): "When more than one view is
available, the models output the maximum probability of the observations across the views" — ``max``
here; ``mean`` is the other common choice.

A study's label j is known when any of its images has j known, and positive when any known one is
positive (with labels repeated per study the two rules agree; they stay defined where they are not).
"""
from __future__ import annotations

import numpy as np

from ..config import Level, StudyAggregation, choose
from ..errors import CxrlabError
from .multilabel import check_inputs, multilabel_report
from .thresholds import fit_thresholds


def study_index(study_ids) -> tuple[np.ndarray, np.ndarray]:
    """(``group`` of each image: 0..S−1 in order of first appearance, the S study ids)."""
    ids = np.asarray(study_ids).astype(str)
    first, group = np.unique(ids, return_index=True, return_inverse=True)[1:]
    order = np.argsort(first, kind="stable")  # renumber studies by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[group.ravel()], ids[np.sort(first)]


def aggregate_studies(probs, targets, mask, study_ids, how: StudyAggregation | str = StudyAggregation.MAX):
    """``(probs, targets, mask, ids)`` with one row per study (order of first appearance): the study's
    probability is the ``max`` or ``mean`` of its images'; its label is known where any image's is, and
    positive where any known image's is."""
    how = choose(StudyAggregation, how, "eval.study_aggregation")
    p, t, known = check_inputs(probs, targets, mask)
    if len(study_ids) != p.shape[0]:
        raise CxrlabError(f"{len(study_ids)} study ids for {p.shape[0]} images")
    group, ids = study_index(study_ids)
    n, labels = ids.size, p.shape[1]
    if how is StudyAggregation.MAX:
        ps = np.full((n, labels), -np.inf)
        np.maximum.at(ps, group, p)
    else:
        ps = np.zeros((n, labels))
        np.add.at(ps, group, p)
        ps /= np.bincount(group, minlength=n)[:, None]
    ks = np.zeros((n, labels), dtype=bool)
    np.logical_or.at(ks, group, known)
    ts = np.zeros((n, labels))
    np.maximum.at(ts, group, np.where(known, t, 0.0))  # masked entries may hold -1 or NaN: never read
    return ps, ts, ks.astype(np.float64), ids


def groups_several(study_ids) -> bool:
    """Whether some study holds more than one image (CheXpert, MIMIC; not NIH or the synthetic source)."""
    group, ids = study_index(study_ids)
    return bool(ids.size < group.size)


def study_level(level: Level | str, study_ids) -> bool:
    """Whether ``eval.level`` asks for the study level on data with these ``study_ids`` (``auto``: where
    some study holds several images, since elsewhere the two levels are the same numbers)."""
    level = choose(Level, level, "eval.level")
    if level is Level.AUTO:
        return study_ids is not None and groups_several(study_ids)
    if level is Level.BOTH and study_ids is None:
        raise CxrlabError("eval.level = both, but the data has no study_id column; use eval.level=image")
    return level is Level.BOTH


def study_report(probs, targets, mask, study_ids, label_names, how=StudyAggregation.MAX, thresholds=None,
                 val=None, threshold_rule="f1", **report_args) -> dict:
    """``multilabel_report`` of the study-aggregated predictions, with ``n_studies``, ``n_images`` and
    ``aggregation``. Thresholds: ``val = (probs, targets, mask, study_ids)`` of the validation part fits
    them on its studies (the level they are applied at); else ``thresholds`` as given (default 0.5)."""
    ps, ts, ms, ids = aggregate_studies(probs, targets, mask, study_ids, how)
    if val is not None:
        vp, vt, vm, _ = aggregate_studies(*val, how)
        thresholds = fit_thresholds(vp, vt, vm, method=threshold_rule)
    out = multilabel_report(ps, ts, ms, label_names, thresholds=thresholds, **report_args)
    out["n_studies"] = int(ids.size)
    out["n_images"] = int(len(study_ids))
    out["aggregation"] = str(choose(StudyAggregation, how, "eval.study_aggregation"))
    return out
