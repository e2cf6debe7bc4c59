"""Synthetic chest radiographs: the embedded default dataset (``synthetic:N``) that the demo and the
tests train on, so that the whole flow runs without downloading anything.

Labels follow NIH ChestX-ray14 exactly: every image draws its label *set* from the table of the
801 distinct label combinations of the NIH label file (``Data_Entry_2017_v2020.csv``, 112,120 images)
with their counts, so both the label frequencies and their co-occurrence are NIH's. Patients have
several images (NIH's distribution of images per patient, mean 3.6) that share anatomy; views are PA
or AP (AP more often when there is a finding, as in NIH). Each finding is drawn as its own
radiological pattern with random location, size and intensity, on top of a randomly jittered
chest with noise, so that findings are learnable but not trivially so at 64 px.

Image ``i`` depends only on ``(seed, i)`` (and its labels), and its labels only on ``(seed, i,
temperature)``: any subset can be rendered independently, and ``generate(n)`` and ``generate(m)``
agree on their common images. Every random stream draws a fixed number of values whatever the labels,
so :func:`render` can draw the same chest with and without a finding.

Source spec grammar (``synthetic:SPEC``)::

    SPEC  := [N] [ "," KEY "=" VALUE ]*          N: number of images (default 2000)
    KEY   := seed (int >= 0, default 0) | size (pixels, default 64) | temperature (float > 0, default 1)
           | labels (nih14 | chexpert14, default nih14)

e.g. ``synthetic:3000`` or ``synthetic:20000,seed=1,temperature=2``; ``synthetic:`` alone is 2000
images. ``temperature`` > 1 flattens the
combination distribution (probabilities ∝ count^(1/T)) so rare labels appear more often; 1 is faithful.

``labels=chexpert14`` draws CheXpert's joint label distribution instead, over its 14 observations
(``cxrlab.labels.CHEXPERT14``, "No Finding" included as the file has it): the label combinations of the
191,027 frontal images of CheXpert v1.0-small ``train.csv`` with uncertain (-1) → 0 and blank → 0
(U-Zeros, the SPML convention), every combination seen at least 5 times (701 of 1,466; 99.3 % of the
images). CheXpert images carry 2.4 positives on average against NIH's 0.7. Findings with an NIH
counterpart reuse its drawing; Lung Opacity, Support Devices, Enlarged Cardiomediastinum, Fracture and
(half of the time) Pleural Other have their own, and Lung Lesion is a mass or a nodule. Views are AP
with CheXpert's rates (59 % without a finding, 87 % with one).

The parts: ``tables`` (label combinations, patients, views: no pixels), ``anatomy`` (the normal chest),
``painter`` (the findings and ``render``); this module turns them into ``Records`` and reads the spec.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ...errors import CxrlabError, closest, unknown
from ..records import Records
from .painter import FAINT, FAINT_SCALE, render
from .tables import (CHEXPERT_FRONTAL_COUNTS, CHEXPERT_FRONTAL_IMAGES, LABEL_SETS, combo_probabilities, combo_table,
                     label_set, prevalence, sample_labels, sample_patients, sample_views)

SPEC_KEYS = ("seed", "size", "temperature", "labels")
DEFAULT_N = 2000

__all__ = ["CHEXPERT_FRONTAL_COUNTS", "CHEXPERT_FRONTAL_IMAGES", "DEFAULT_N", "FAINT", "FAINT_SCALE", "LABEL_SETS",
           "SPEC_KEYS", "SyntheticReader", "combo_probabilities", "combo_table", "generate", "label_set",
           "load_synthetic", "make_records", "parse_spec", "prevalence", "render", "sample_labels",
           "sample_patients", "sample_views"]


class SyntheticReader:
    """``Records.reader`` of a synthetic set: row ``i`` → its rendered image (picklable)."""

    def __init__(self, seed: int, size: int, labels: np.ndarray, patients: np.ndarray, views: np.ndarray,
                 label_set: str = "nih14"):
        self.seed, self.size, self.label_set = seed, size, label_set
        self.labels, self.patients, self.views = labels.astype(bool), patients, views

    def __call__(self, i: int) -> np.ndarray:
        return render(i, self.labels[i], self.seed, self.size, int(self.patients[i]), str(self.views[i]),
                      self.label_set)


def make_records(n: int, seed: int = 0, size: int = 64, temperature: float = 1.0,
                 labels: str = "nih14") -> Records:
    """Records of ``n`` synthetic images (labels and metadata; images rendered on read)."""
    _check(n, seed, size)
    space = label_set(labels)
    label_set_name = labels
    labels = sample_labels(n, seed, temperature, label_set_name)
    patients, follow_up = sample_patients(n, seed)
    views = sample_views(labels, seed, label_set_name)
    patient_id = pd.Series([f"s{seed}p{p:06d}" for p in patients], dtype="str")
    meta = pd.DataFrame({
        "path": pd.Series([f"synthetic://{seed}/{i}" for i in range(n)], dtype="str"),
        "patient_id": patient_id,
        "study_id": patient_id + pd.Series([f"_{f:03d}" for f in follow_up], dtype="str"),
        "view": pd.Series(views, dtype="str"),
        "frontal_lateral": pd.Series(["frontal"] * n, dtype="str"),
    })
    reader = SyntheticReader(seed, size, labels, patients, views, label_set_name)
    return Records("synthetic", space, labels, meta, reader)


def generate(n: int, size: int = 64, seed: int = 0, temperature: float = 1.0,
             labels: str = "nih14") -> tuple[np.ndarray, Records]:
    """``n`` rendered images (float32 N×size×size in [0, 1]) and their Records."""
    records = make_records(n, seed, size, temperature, labels)
    images = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        images[i] = records.read(i)
    return images, records


def load_synthetic(spec: str) -> Records:
    """Records for a ``synthetic:`` source spec (see the module docstring for the grammar)."""
    options = parse_spec(spec)
    return make_records(options.pop("n"), **options)


def parse_spec(spec: str) -> dict:
    """``"3000,seed=1"`` → {"n": 3000, "seed": 1, "size": 64, "temperature": 1.0, "labels": "nih14"}."""
    parts = [p.strip() for p in str(spec).split(",")]
    where = f"synthetic source {spec!r} (expected N[,seed=S][,size=PX][,temperature=T][,labels=nih14|chexpert14])"
    n = _number(parts[0], int, "N", where) if parts[0] else DEFAULT_N
    out = {"n": n, "seed": 0, "size": 64, "temperature": 1.0, "labels": "nih14"}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in SPEC_KEYS:
            hint = closest(key, SPEC_KEYS) if key not in SPEC_KEYS else None
            raise CxrlabError(f"{where}: bad option {part!r}"
                              + (f"; did you mean {hint!r}?" if hint else "")
                              + f" (options: {', '.join(k + '=' for k in SPEC_KEYS)})")
        if key == "labels":
            if value.strip() not in LABEL_SETS:
                raise unknown(f"{where}: label set", value.strip(), tuple(LABEL_SETS))
            out[key] = value.strip()
            continue
        out[key] = _number(value.strip(), float if key == "temperature" else int, key, where)
    _check(out["n"], out["seed"], out["size"])
    if not out["temperature"] > 0:
        raise CxrlabError(f"{where}: temperature must be > 0")
    return out


def _number(text: str, kind, what: str, where: str):
    try:
        return kind(text)
    except ValueError:
        raise CxrlabError(f"{where}: {what} must be {'an integer' if kind is int else 'a number'}, "
                          f"got {text!r}") from None


def _check(n: int, seed: int, size: int) -> None:
    if n < 1:
        raise CxrlabError(f"synthetic: need at least 1 image, got N={n}")
    if seed < 0:
        raise CxrlabError(f"synthetic: seed must be >= 0, got {seed}")
    if size < 16:
        raise CxrlabError(f"synthetic: size must be >= 16 pixels, got {size}")
