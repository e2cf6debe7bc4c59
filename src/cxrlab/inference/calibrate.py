"""``cxrlab calibrate``: refit a checkpoint's per-label thresholds (and optionally a per-label
temperature) on a labelled set of the site where it will be used, recording where they came from.

A model moved to another hospital sees other scanners, protocols and prevalences; at the thresholds
fitted on the training site's validation part it can flood users with false positives. Calibration
writes a copy of the checkpoint whose ``checkpoint.json`` holds

* ``thresholds``: refitted per label (F1 or Youden on the local set, as training fits them) for labels
  the local set scores with both classes present; the others keep their old threshold;
* ``temperature`` (with ``--temperature``): per label, ``T_c`` minimising the local binary cross-entropy
  of ``sigmoid(logit / T_c)`` (temperature scaling, Guo et al., "On Calibration of Modern Neural
  Networks", ICML 2017, here per label); thresholds are then fitted on the scaled probabilities.
  Every backend (checkpoint predict, evaluate, heatmap, the ONNX export, the server) applies it and
  reports scaled probabilities. ``thresholds`` are stored on the unscaled scale, as every card holds
  them (``sigmoid(T·logit(t))``; scaling is monotonic per label); the backends decide at
  :meth:`~cxrlab.model_card.ModelCard.output_thresholds`;
* ``threshold_source`` (one line) and ``calibration`` (source, split, n, date, method, labels refitted).

The copy's model card is rewritten through the card's codec; nothing else of the checkpoint changes.
"""
from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import numpy as np

from ..checkpoint import find_checkpoint, read_card, read_info, write_card
from ..data.scoring import scoring_set
from ..errors import CxrlabError
from ..metrics import fit_thresholds
from ..model_card import logit, scaled_thresholds, unscaled_thresholds
from .batch import predict_tolerant
from .predictor import Predictor


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


def calibrate(checkpoint, source: str, out, temperature: bool = False, method: str = "f1",
              policy: str | None = None, split: str = "all") -> dict:
    """Write a calibrated copy of ``checkpoint`` at ``out``; return its ``calibration`` record."""
    folder = find_checkpoint(Path(checkpoint))
    out = Path(out)
    if out.resolve() == folder.resolve():
        raise CxrlabError(f"--out {out} is the checkpoint itself; calibration writes a copy")
    if out.exists():
        raise CxrlabError(f"--out {out} exists; choose a new folder for the calibrated checkpoint")
    # the model's own probabilities: a temperature already recorded is applied below, unless refitted
    predictor = Predictor.from_checkpoint(folder, calibrated=False)
    card = predictor.card
    scored = scoring_set(card, source, split, policy)
    rows, outputs = scored.rows, scored.outputs
    if len(rows) == 0:
        raise CxrlabError(f"source {source!r} has no labelled images to calibrate on")
    probs = predict_tolerant(predictor, len(rows), lambda i: scored.fitted(card.input, i), strict=True)[0]
    probs = probs[:, outputs].astype(np.float64)
    known = np.asarray(scored.mask) > 0
    target = np.asarray(scored.target) > 0.5
    previous = read_card(folder).temperature
    temperatures = np.ones(len(predictor.label_names)) if previous is None else np.asarray(previous, np.float64)
    logits = logit(probs)
    if temperature:
        for k, o in enumerate(outputs):
            temperatures[o] = fit_temperature(logits[known[:, k], k], target[known[:, k], k])
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
              "previous_threshold_source": card.threshold_source, "from_checkpoint": str(folder)}
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
