"""``cxrlab calibrate``: refit a checkpoint's per-label thresholds (and optionally a per-label
temperature) on a labelled set of the site where it will be used, recording where they came from.

A model moved to another hospital sees other scanners, protocols and prevalences; at the thresholds
fitted on the training site's validation part it can flood users with false positives. Calibration
writes a copy of the checkpoint whose ``checkpoint.json`` holds

* ``thresholds``: refitted per label (F1 or Youden on the local set, as training fits them) for labels
  the local set scores with both classes present; the others keep their old threshold;
* ``temperature`` (with ``--temperature``): per label, ``T_c`` minimising the local binary cross-entropy
  of ``sigmoid(logit / T_c)`` (temperature scaling, Guo et al., "On Calibration of Modern Neural
  Networks", ICML 2017, here per label); thresholds are then fitted on the scaled probabilities. A label
  with fewer than 5 positives or negatives keeps its previous temperature (a warning names it; the record's
  ``temperature_kept``), since so few images pin the fit at a bound.
  Every backend (checkpoint predict, evaluate, heatmap, the ONNX export, the server) applies it and
  reports scaled probabilities. ``thresholds`` are stored on the unscaled scale, as every card holds
  them (``sigmoid(T·logit(t))``; scaling is monotonic per label); the backends decide at
  :meth:`~cxrlab.model_card.ModelCard.output_thresholds`;
* ``threshold_source`` (one line) and ``calibration`` (source, split, n, date, method, labels refitted,
  and ``before_after``: ECE over equal-mass bins and Brier score, per label and mean, of the checkpoint's
  probabilities before and of the calibrated copy's after, on the data it fitted and, with ``holdout``,
  on a held-out part: another split of the same source, or another labelled source). Thresholds do
  not change probabilities, so without ``--temperature`` before equals after.

The copy's model card is rewritten through the card's codec; nothing else of the checkpoint changes.
"""
from __future__ import annotations

import datetime as dt
import logging
import shutil
from pathlib import Path

import numpy as np

from ..checkpoint import find_checkpoint, read_card, read_info, write_card
from ..data.scoring import scoring_set
from ..errors import CxrlabError
from ..metrics import fit_thresholds
from ..metrics.calibration import DEFAULT_BINS, label_calibration
from ..model_card import logit, scaled_thresholds, unscaled_thresholds
from ..paths import check_new_dir
from .batch import predict_tolerant
from .predictor import Predictor

log = logging.getLogger("cxrlab")
MIN_PER_CLASS = 5  # positives and negatives a label needs for its temperature (fewer pin it at a bound)


def fit_temperature(logits: np.ndarray, targets: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0),
                    iterations: int = 50) -> float:
    """``T`` in ``bounds`` minimising mean BCE(sigmoid(z / T), y), by Newton's method on ``a = 1/T`` (the
    loss is convex in ``a``; each step is clipped to the bounds). 1.0 when both classes are not present.
    A label whose scores carry no information (or the inverse) ends at the upper bound: its probabilities
    are flattened towards 0.5 rather than made constant."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    if z.size == 0 or y.min() == y.max():
        return 1.0
    low, high = 1.0 / bounds[1], 1.0 / bounds[0]
    a = 1.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-a * z))
        grad = np.mean((p - y) * z)
        hess = np.mean(p * (1 - p) * z * z)
        if hess <= 1e-12:
            break
        a_new = float(np.clip(a - grad / hess, low, high))
        if abs(a_new - a) < 1e-10 * max(1.0, a):
            a = a_new
            break
        a = a_new
    return float(1.0 / a)


def _holdout(source: str, split: str, holdout: str) -> tuple[str, str]:
    """(source, split) of the held-out part: ``KIND:LOCATION`` is another source (all of it), anything
    else a split of ``source`` other than the fitted one."""
    if ":" in holdout:
        return holdout, "all"
    if split == "all" or holdout == split:
        raise CxrlabError(f"--holdout {holdout}: it overlaps the fitted part (--split {split}); fit on one "
                          "official split and hold out another (e.g. --split val --holdout test), or give a "
                          "source KIND:LOCATION")
    return source, holdout


def _calibration_summary(probs: np.ndarray, scored, names: list[str], bins: int) -> dict:
    known = np.asarray(scored.mask) > 0
    ece, brier = label_calibration(probs, np.asarray(scored.target, dtype=np.float64), known, bins)
    mean = (lambda a: float(np.nanmean(a)) if np.isfinite(a).any() else None)
    return {"mean_ece": mean(ece), "mean_brier": mean(brier),
            "per_label": {n: {"ece": None if not np.isfinite(e) else float(e),
                              "brier": None if not np.isfinite(b) else float(b)} for n, e, b in zip(names, ece, brier)}}


def _before_after(logits: np.ndarray, scored, names, old, new, bins: int) -> dict:
    """ECE and Brier of sigmoid(logit / T) under the old temperatures (before) and the new (after)."""
    return {"n": int(len(scored.rows)),
            "before": _calibration_summary(1 / (1 + np.exp(-logits / old)), scored, names, bins),
            "after": _calibration_summary(1 / (1 + np.exp(-logits / new)), scored, names, bins)}


def calibrate(checkpoint, source: str, out, temperature: bool = False, method: str = "f1",
              policy: str | None = None, split: str = "all", holdout: str | None = None,
              bins: int = DEFAULT_BINS) -> dict:
    """Write a calibrated copy of ``checkpoint`` at ``out``; return its ``calibration`` record."""
    folder = find_checkpoint(Path(checkpoint))
    out = Path(out)
    if out.resolve() == folder.resolve():
        raise CxrlabError(f"--out {out} is the checkpoint itself; calibration writes a copy")
    if out.exists():
        raise CxrlabError(f"--out {out} exists; choose a new folder for the calibrated checkpoint")
    check_new_dir(out, what="--out")  # a file or a denied folder on the way fails now, not after the work
    # the model's own probabilities: a temperature already recorded is applied below, unless refitted
    predictor = Predictor.from_checkpoint(folder, calibrated=False)
    card = predictor.card
    scored = scoring_set(card, source, split, policy)
    held = scoring_set(card, *_holdout(source, split, holdout), policy) if holdout else None
    rows, outputs = scored.rows, scored.outputs
    if len(rows) == 0:
        raise CxrlabError(f"source {source!r} has no labelled images to calibrate on")
    probs = predict_tolerant(predictor, len(rows), lambda i: scored.fitted(card.input, i), strict=True)[0]
    probs = probs[:, outputs].astype(np.float64)
    known = np.asarray(scored.mask) > 0
    target = np.asarray(scored.target) > 0.5
    previous = read_card(folder).temperature
    temperatures = np.ones(len(predictor.label_names)) if previous is None else np.asarray(previous, np.float64)
    old_temperatures = temperatures.copy()
    logits = logit(probs)
    too_few = {}  # label -> (positives, negatives) too few to fit a temperature on: the old one is kept
    if temperature:
        for k, o in enumerate(outputs):
            y = target[known[:, k], k]
            if min(int(y.sum()), int((~y).sum())) < MIN_PER_CLASS:
                too_few[predictor.label_names[o]] = (int(y.sum()), int((~y).sum()))
                continue
            temperatures[o] = fit_temperature(logits[known[:, k], k], y)
        if too_few:
            shown = ", ".join(f"{n} ({p}+/{q}-)" for n, (p, q) in list(too_few.items())[:8])
            log.warning(f"calibrate: warning: {len(too_few)} labels have fewer than {MIN_PER_CLASS} positives or "
                        f"negatives in {source}, too few to fit a temperature; they keep their previous one: {shown}"
                        + (", ..." if len(too_few) > 8 else ""))
    if temperature or previous is not None:
        probs = 1 / (1 + np.exp(-logits / temperatures[outputs]))
    fitted = fit_thresholds(probs, scored.target, scored.mask, method=method)  # on the scaled probabilities
    thresholds = scaled_thresholds(predictor.thresholds, previous)
    refitted, kept = [], []
    for k, o in enumerate(outputs):
        y = target[known[:, k], k]
        if y.any() and not y.all():
            thresholds[o] = fitted[k]
            refitted.append(predictor.label_names[o])
        else:
            kept.append(predictor.label_names[o])
    kept += [n for i, n in enumerate(predictor.label_names) if i not in outputs]
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    record = {"source": source, "split": split, "n": int(len(rows)), "date": date, "method": method,
              "temperature": bool(temperature), "labels_refitted": refitted, "labels_kept": kept,
              "temperature_kept": {n: {"positives": p, "negatives": q} for n, (p, q) in too_few.items()},
              "previous_threshold_source": card.threshold_source, "from_checkpoint": str(folder)}
    names = [predictor.label_names[o] for o in outputs]
    record["before_after"] = {"bins": int(bins), "binning": "equal-mass", "fitted": _before_after(
        logits, scored, names, old_temperatures[outputs], temperatures[outputs], bins)}
    if held is not None:
        held_probs = predict_tolerant(predictor, len(held.rows), lambda i: held.fitted(card.input, i), strict=True)[0]
        held_names = [predictor.label_names[o] for o in held.outputs]
        record["before_after"]["holdout"] = {"source": holdout, **_before_after(
            logit(held_probs[:, held.outputs].astype(np.float64)), held, held_names,
            old_temperatures[held.outputs], temperatures[held.outputs], bins)}
    shutil.copytree(folder, out)
    scaled = temperature or previous is not None
    stored = unscaled_thresholds(thresholds, temperatures) if scaled else thresholds
    card = card.replace(
        thresholds=tuple(float(t) for t in stored),
        threshold_source=(f"refitted per label ({method}{', after per-label temperature scaling' if temperature else ''}) "
                          f"on {source} (split {split}, {len(rows)} images) by cxrlab calibrate, {date}"),
        temperature=tuple(float(t) for t in temperatures) if scaled else None)
    write_card(out, card, {**read_info(out), "calibration": record})
    return record
