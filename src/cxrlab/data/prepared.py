"""A recipe's data, ready to train on: the cached images of its source, labels after its policies,
and the train/val/test rows of its split. The data half of an experiment, with no model in sight."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import Policy, Recipe, Split, choose
from ..errors import CxrlabError, unknown
from ..labels import LabelSpace, parse_labels
from .cache import open_cache, prepare
from .policies import apply_policy
from .sources import parse_source
from .splits import random_split


@dataclass
class PreparedData:
    """The cached images of a source with its labels after the recipe's policies.

    ``target``/``mask`` are the training labels (e.g. single-positive), ``eval_target``/``eval_mask``
    the full labels validation and test are scored on, both in the training label space ``labels``;
    ``full_target`` is set when the training labels withhold positives (SPML), for measuring
    pseudo-label recovery only. Metrics are reported on ``eval_columns``: the source's own labels,
    without a "No Finding" label that SPML may have added.
    """

    labels: LabelSpace
    images: np.ndarray
    index: pd.DataFrame          # one row per kept image (meta: path, patient_id, ...)
    image_rows: np.ndarray       # row of each kept image in ``images``
    target: np.ndarray
    mask: np.ndarray
    eval_target: np.ndarray
    eval_mask: np.ndarray
    full_target: np.ndarray | None
    eval_columns: np.ndarray

    @property
    def eval_labels(self) -> LabelSpace:
        return LabelSpace(self.labels.name, tuple(self.labels.names[i] for i in self.eval_columns))

    def strata(self) -> np.ndarray:
        """Known positives on the evaluated labels: what splits stratify on (identical across policies)."""
        return (self.eval_target * self.eval_mask)[:, self.eval_columns]


def default_cache_dir(recipe: Recipe) -> Path:
    """Where ``train`` makes the cache of a recipe's data when ``data.cache`` names none: a folder
    under ``data.cache_dir`` (default ``$CXRLAB_CACHE`` or ``~/.cache/cxrlab``) keyed by what shapes it."""
    d = recipe.data
    root = Path(d.cache_dir) if d.cache_dir else Path(os.environ.get("CXRLAB_CACHE", Path.home() / ".cache" / "cxrlab"))
    identity = [d.source, d.views, d.image_size, d.labels, d.resize, d.labeller]
    if d.duplicates != "warn":  # only then, so existing caches keep their folders
        identity.append(d.duplicates)
    key = hashlib.sha1(json.dumps(identity, default=str).encode()).hexdigest()[:12]
    return root / f"{d.source.split(':', 1)[0]}-{d.image_size}px-{key}"


def check_labels(spec, available: LabelSpace) -> LabelSpace | None:
    """``data.labels`` as a label space, each name one of the source's (else the closest is suggested)."""
    if spec is None:
        return None
    wanted = parse_labels(spec)
    for name in wanted.names:
        if name not in available.names:
            raise CxrlabError(f"data.labels: {unknown('label', name, available.names)}")
    return wanted


def prepare_data(recipe: Recipe, progress: bool = True) -> PreparedData:
    d = recipe.data
    if d.cache:
        # a cache the user prepared: prepare() reuses it only if it holds this source at this size and
        # resize mode (the fingerprint covers the paths, i.e. the views, and the label values)
        records = parse_source(d.source, views=d.views, labeller=d.labeller, labels=d.labels,
                               duplicates=d.duplicates)
        check_labels(d.labels, records.labels)
        cache_dir = Path(d.cache)
        if not (cache_dir / "cache.json").is_file():
            raise CxrlabError(f"data.cache: {cache_dir} is not a finished cache; make it with "
                              f"`cxrlab prepare {d.source} --size {d.image_size} --out {cache_dir}`")
        prepare(records, cache_dir, size=d.image_size, mode=d.resize, progress=progress)
    else:
        cache_dir = default_cache_dir(recipe)
        if not (cache_dir / "cache.json").is_file():
            records = parse_source(d.source, views=d.views, labeller=d.labeller, labels=d.labels,
                                   duplicates=d.duplicates)
            check_labels(d.labels, records.labels)  # a misspelt label fails before the images are decoded
            prepare(records, cache_dir, size=d.image_size, mode=d.resize, progress=progress)
    images, index, labels, _info = open_cache(cache_dir)
    values = index[list(labels.names)].to_numpy(dtype=np.float32)
    if d.labels is not None:
        wanted = check_labels(d.labels, labels)
        values = values[:, [labels.index(n) for n in wanted.names]]
        labels = wanted
    if d.policy == Policy.SPML:
        # keyed by image path so each image's kept positive does not depend on row order
        # the policy also returns the full labels the positive was drawn from: what val/test are scored on
        train = apply_policy(values, labels, Policy.SPML, per_label=d.policy_per_label, seed=d.seed,
                             no_finding=d.spml_no_finding, keys=index["path"].to_numpy())
        rows = train.rows
        columns = np.array([train.labels.index(n) for n in labels.names])
        return PreparedData(train.labels, images, index.iloc[rows].reset_index(drop=True), rows, train.target,
                            train.mask, train.full_target, train.full_mask, train.full_target, columns)
    result = apply_policy(values, labels, d.policy, per_label=d.policy_per_label, add_no_finding=d.add_no_finding)
    rows = result.rows
    columns = np.array([result.labels.index(n) for n in labels.names])  # an added "No Finding" is not scored
    return PreparedData(result.labels, images, index.iloc[rows].reset_index(drop=True), rows,
                        result.target, result.mask, result.target, result.mask, None, columns)


def split_rows(recipe: Recipe, data: PreparedData, manifest: pd.DataFrame | None = None,
               fold: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Train/val/test row positions (into ``data``), patient-disjoint.

    ``official``: the source's split column; where it lacks a test part (CheXpert without test_labels.csv) its validation
    part is the test set, and where it lacks a validation part one is carved from train by patient.
    ``random``: a stratified patient-disjoint split by ``val_fraction``/``test_fraction``.
    ``cv``: fold ``fold = (repeat, k)`` of ``manifest`` is the test set; validation is carved from the
    remaining patients.
    """
    d = recipe.data
    index = data.index
    everything = np.arange(len(index))
    split = choose(Split, d.split, "data.split")  # a recipe's is checked at load; a hand-built one is not
    if split is Split.CV or fold is not None:
        if manifest is None or fold is None:
            raise CxrlabError("data.split = cv needs a split manifest and a fold (use `cxrlab cv`)")
        repeat, k = fold
        in_repeat = manifest[manifest["repeat"] == repeat].set_index("path")["fold"]
        folds = index["path"].map(in_repeat)
        if folds.isna().any():
            raise CxrlabError(f"split manifest lacks {int(folds.isna().sum())} images of the data, "
                              f"e.g. {index['path'][folds.isna()].iloc[0]!r}")
        test = everything[folds.to_numpy() == k]
        rest = everything[folds.to_numpy() != k]
        train, val = _carve(rest, data, d.val_fraction, d.seed + 1000 * repeat + k)
        return {"train": train, "val": val, "test": test}
    if split is Split.OFFICIAL:
        if "split" not in index.columns:
            raise CxrlabError(f"data.split = official but source {d.source!r} has no official split; "
                              "use data.split=random")
        parts = {name: everything[index["split"].to_numpy() == name] for name in ("train", "val", "test")}
        if len(parts["test"]) == 0:
            parts["test"], parts["val"] = parts["val"], np.array([], dtype=np.int64)
        if len(parts["val"]) == 0:
            parts["train"], parts["val"] = _carve(parts["train"], data, d.val_fraction, d.seed)
        return parts
    parts = random_split(index["patient_id"].to_numpy(), data.strata(),  # Split.RANDOM
                         val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=d.seed)
    return {name: np.asarray(rows, dtype=np.int64) for name, rows in parts.items()}


def _carve(rows: np.ndarray, data: PreparedData, fraction: float, seed: int):
    parts = random_split(data.index["patient_id"].to_numpy()[rows], data.strata()[rows],
                         val_fraction=fraction, test_fraction=0.0, seed=seed)
    return rows[np.asarray(parts["train"], dtype=np.int64)], rows[np.asarray(parts["val"], dtype=np.int64)]
