"""One experiment from a recipe: source -> cache -> policy -> split -> train -> thresholds -> test report.

This is the single place where the data layer, the model, the objective, the regime, the trainer and
the evaluation meet; the CLI commands ``train``, ``cv``, ``compare`` and ``demo`` all call ``run``.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import Recipe
from ..errors import CxrlabError
from ..labels import LabelSpace, parse_labels


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


def cache_root(recipe: Recipe) -> Path:
    if recipe.data.cache_dir:
        return Path(recipe.data.cache_dir)
    return Path(os.environ.get("CXRLAB_CACHE", Path.home() / ".cache" / "cxrlab"))


def prepare_data(recipe: Recipe, progress: bool = True) -> PreparedData:
    from ..data.cache import open_cache, prepare
    from ..data.policies import apply_policy
    from ..data.sources import parse_source

    d = recipe.data
    identity = [d.source, d.views, d.image_size, d.labels, d.resize, d.labeller]
    key = hashlib.sha1(json.dumps(identity, default=str).encode()).hexdigest()[:12]
    cache_dir = cache_root(recipe) / f"{d.source.split(':', 1)[0]}-{d.image_size}px-{key}"
    if not (cache_dir / "cache.json").is_file():
        records = parse_source(d.source, views=d.views, labeller=d.labeller, labels=d.labels)
        prepare(records, cache_dir, size=d.image_size, mode=d.resize, progress=progress)
    images, index, labels, _info = open_cache(cache_dir)
    values = index[list(labels.names)].to_numpy(dtype=np.float32)
    if d.labels is not None:
        wanted = parse_labels(d.labels)
        missing = [n for n in wanted.names if n not in labels.names]
        if missing:
            raise CxrlabError(f"data.labels: {missing} not in the source's labels {list(labels.names)}")
        values = values[:, [labels.index(n) for n in wanted.names]]
        labels = wanted
    if d.policy == "spml":
        # keyed by image path so each image's kept positive does not depend on row order
        # the policy also returns the full labels the positive was drawn from: what val/test are scored on
        train = apply_policy(values, labels, "spml", per_label=d.policy_per_label, seed=d.seed,
                             no_finding=d.spml_no_finding, keys=index["path"].to_numpy())
        rows = train.rows
        columns = np.array([train.labels.index(n) for n in labels.names])
        return PreparedData(train.labels, images, index.iloc[rows].reset_index(drop=True), rows, train.target,
                            train.mask, train.full_target, train.full_mask, train.full_target, columns)
    result = apply_policy(values, labels, d.policy, per_label=d.policy_per_label)
    rows = result.rows
    return PreparedData(result.labels, images, index.iloc[rows].reset_index(drop=True), rows,
                        result.target, result.mask, result.target, result.mask, None, np.arange(len(result.labels)))


def check_parts(recipe: Recipe) -> None:
    """Fail on a misspelt backbone, head, loss, regime or argument before any data is prepared
    (preparing a real dataset can take an hour)."""
    from ..data.transforms import parse_spec
    from ..errors import unknown
    from ..models import check_head
    from ..models.backbone import check_backbone_name
    from ..registry import LOSSES, REGIMES

    check_backbone_name(recipe.model.backbone)
    check_head(recipe.model.head, recipe.model.head_args)
    for name, value in recipe.loss.items():
        accepted = [p for p in inspect.signature(LOSSES.get(name)).parameters if p != "ctx"]
        for key in (value if isinstance(value, dict) else {}):
            if key != "weight" and key not in accepted:
                raise unknown(f"argument of loss {name!r}", key, ["weight", *accepted])
    accepted = [p for p in inspect.signature(REGIMES.get(recipe.regime.name)).parameters
                if p not in ("weak", "strong", "feature_dim", "label_names")]
    for key in recipe.regime.args:
        if key not in accepted and key != "feature_dim":
            raise unknown(f"regime.args key for regime {recipe.regime.name!r}", key, accepted)
    parse_spec(recipe.augment.weak)
    parse_spec(recipe.augment.strong)


def build_parts(recipe: Recipe, data: PreparedData, train_rows: np.ndarray):
    """Model, objective and regime for a recipe, with the loss context from the training rows."""
    from ..data.transforms import build_augment
    from ..losses.base import LossContext, Objective
    from ..models import build_model
    from ..registry import REGIMES
    from .trainer import seed_everything

    seed_everything(recipe.train.seed)  # model init and regime modules are part of the seeded run
    m = recipe.model
    model = build_model(m.backbone, m.head, len(data.labels), pretrained=m.pretrained, drop_rate=m.drop_rate,
                        head_args=m.head_args)
    full = data.full_target[train_rows] if data.full_target is not None else None
    ctx = LossContext.from_targets(data.labels.names, data.target[train_rows], data.mask[train_rows], full)
    if hasattr(model.head, "set_cooccurrence"):
        model.head.set_cooccurrence(ctx.cooccurrence)
    objective = Objective(recipe.loss, ctx)
    regime_cls = REGIMES.get(recipe.regime.name)
    args = dict(recipe.regime.args)
    accepted = inspect.signature(regime_cls).parameters
    if "feature_dim" in accepted and "feature_dim" not in args:
        args["feature_dim"] = model.backbone.num_features
    if "label_names" in accepted:
        args["label_names"] = tuple(data.labels.names)
    try:
        regime = regime_cls(build_augment(recipe.augment.weak), build_augment(recipe.augment.strong), **args)
    except TypeError as exc:
        raise CxrlabError(f"regime {recipe.regime.name!r}: bad regime.args {args}: {exc}") from exc
    return model, objective, regime


def split_rows(recipe: Recipe, data: PreparedData, manifest: pd.DataFrame | None = None,
               fold: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Train/val/test row positions (into ``data``), patient-disjoint.

    ``official``: the source's split column; where it lacks a test part (CheXpert) its validation
    part is the test set, and where it lacks a validation part one is carved from train by patient.
    ``random``: a stratified patient-disjoint split by ``val_fraction``/``test_fraction``.
    ``cv``: fold ``fold = (repeat, k)`` of ``manifest`` is the test set; validation is carved from the
    remaining patients.
    """
    from ..data.splits import random_split

    d = recipe.data
    index = data.index
    everything = np.arange(len(index))
    if d.split == "cv" or fold is not None:
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
    if d.split == "official":
        if "split" not in index.columns:
            raise CxrlabError(f"data.split = official but source {d.source!r} has no official split; "
                              "use data.split=random")
        parts = {name: everything[index["split"].to_numpy() == name] for name in ("train", "val", "test")}
        if len(parts["test"]) == 0:
            parts["test"], parts["val"] = parts["val"], np.array([], dtype=np.int64)
        if len(parts["val"]) == 0:
            parts["train"], parts["val"] = _carve(parts["train"], data, d.val_fraction, d.seed)
        return parts
    if d.split == "random":
        parts = random_split(index["patient_id"].to_numpy(), data.strata(),
                             val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=d.seed)
        return {name: np.asarray(rows, dtype=np.int64) for name, rows in parts.items()}
    raise CxrlabError(f"unknown data.split {d.split!r} (valid: official, random, cv)")


def _carve(rows: np.ndarray, data: PreparedData, fraction: float, seed: int):
    from ..data.splits import random_split

    parts = random_split(data.index["patient_id"].to_numpy()[rows], data.strata()[rows],
                         val_fraction=fraction, test_fraction=0.0, seed=seed)
    return rows[np.asarray(parts["train"], dtype=np.int64)], rows[np.asarray(parts["val"], dtype=np.int64)]


def run(recipe: Recipe, out_dir: Path, resume: bool = False, data: PreparedData | None = None,
        manifest: pd.DataFrame | None = None, fold: tuple[int, int] | None = None, progress: bool = True) -> dict:
    """Train on the train part, select on val, fit thresholds on val, and report on test."""
    from ..data.dataset import ImageSet
    from ..evaluation.metrics import multilabel_report
    from ..evaluation.report import write_report
    from ..evaluation.thresholds import fit_thresholds
    from .checkpoint import set_thresholds
    from .trainer import Trainer, make_loader

    from . import distributed as dist

    check_parts(recipe)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if data is None:
        # under torchrun the main process builds the cache; the others open it once it is complete
        ddp = dist.init_distributed()
        if ddp.is_main:
            data = prepare_data(recipe, progress=progress)
        dist.barrier()
        if data is None:
            data = prepare_data(recipe, progress=False)
    parts = split_rows(recipe, data, manifest, fold)
    for name, rows in parts.items():
        if len(rows) == 0:
            raise CxrlabError(f"the {name} part of the split is empty ({recipe.data.split} split of "
                              f"{len(data.index)} images); adjust data.val_fraction / data.test_fraction")
    model, objective, regime = build_parts(recipe, data, parts["train"])

    def dataset(rows, train: bool):
        if train:
            full = data.full_target[rows] if data.full_target is not None else None
            return ImageSet(data.images, data.target[rows], data.mask[rows], rows=data.image_rows[rows],
                            full_target=full)
        return ImageSet(data.images, data.eval_target[rows], data.eval_mask[rows], rows=data.image_rows[rows])

    t = recipe.train
    loaders = {name: make_loader(dataset(rows, name == "train"), t.batch_size, shuffle=name == "train", seed=t.seed,
                                 num_workers=recipe.data.num_workers)
               for name, rows in parts.items()}
    trainer = Trainer(recipe, model, objective, regime, out_dir, data.labels.names)
    fit = trainer.fit(loaders["train"], loaders["val"], resume=resume)

    names = list(data.eval_labels.names)
    val_probs, val_target, val_mask = trainer.predict(loaders["val"])
    test_probs, test_target, test_mask = trainer.predict(loaders["test"])
    cols = data.eval_columns
    val_probs, val_target, val_mask = val_probs[:, cols], val_target[:, cols], val_mask[:, cols]
    test_probs, test_target, test_mask = test_probs[:, cols], test_target[:, cols], test_mask[:, cols]
    thresholds = fit_thresholds(val_probs, val_target, val_mask, method=recipe.eval.threshold)
    metrics = multilabel_report(test_probs, test_target, test_mask, names, thresholds=thresholds,
                                bootstrap=recipe.eval.bootstrap, ci=recipe.eval.ci, seed=recipe.train.seed)
    metrics["threshold_source"] = f"per label, fitted on the validation part ({recipe.eval.threshold})"
    metrics["split_sizes"] = {name: int(len(rows)) for name, rows in parts.items()}
    if fit.get("epoch_stats"):
        metrics["training"] = fit["epoch_stats"]
        # the last epoch's regime statistics (e.g. MPC pseudo-label precision/recall) at the top level,
        # so cross-validation and comparisons aggregate them like any metric
        metrics.update({k: v for k, v in fit["epoch_stats"][-1].items() if k != "epoch"})
    if not dist.is_main():  # every rank holds the gathered predictions; one writes the report
        dist.barrier()
        return {"report": out_dir / "report" / "report.md", "metrics": metrics, "checkpoint": fit["checkpoint"],
                "model": trainer.model, "history": fit.get("history")}
    thresholds_all = np.full(len(data.labels), 0.5)
    thresholds_all[data.eval_columns] = thresholds
    set_thresholds(fit["checkpoint"], thresholds_all.tolist())
    train_rows = parts["train"]
    head = getattr(trainer.model, "head", None)
    if hasattr(head, "correlation"):  # label-level heads: how the learned G relates to the data
        (out_dir / "report").mkdir(parents=True, exist_ok=True)
        metrics["g_vs_cooccurrence_r"] = _plot_correlation(out_dir / "report" / "correlation.png", head, data,
                                                           train_rows)
    report = write_report(out_dir / "report", metrics, test_probs, test_target, test_mask, names,
                          config=recipe.to_dict(), history=fit.get("history"),
                          train_targets=data.eval_target[train_rows][:, cols],
                          train_mask=data.eval_mask[train_rows][:, cols])
    predictions = pd.DataFrame(test_probs, columns=names)
    predictions.insert(0, "path", data.index["path"].to_numpy()[parts["test"]])
    predictions.to_csv(out_dir / "report" / "test_predictions.csv", index=False, float_format="%.6f")
    dist.barrier()
    return {"report": Path(report), "metrics": metrics, "checkpoint": fit["checkpoint"], "model": trainer.model,
            "history": fit.get("history")}


def _plot_correlation(path: Path, head, data: PreparedData, train_rows: np.ndarray) -> float:
    """The head's learned global label correlation G next to the training labels' co-occurrence
    P(j | i), both row-normalised with the diagonal blanked, so their off-diagonal structure compares.
    Returns the Pearson correlation of their off-diagonal entries (NaN if either is constant)."""
    from ..evaluation.metrics import label_cooccurrence
    from ..evaluation.plots import plot_matrices

    def offdiag(m: np.ndarray) -> np.ndarray:
        m = np.array(m, dtype=np.float64)
        np.fill_diagonal(m, 0.0)
        rows = m.sum(1, keepdims=True)
        m = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
        np.fill_diagonal(m, np.nan)
        return m

    g = offdiag(head.correlation().detach().float().cpu().numpy())
    co = offdiag(label_cooccurrence(data.target[train_rows], data.mask[train_rows]))
    off = ~np.isnan(g)
    a, b = g[off], co[off]
    r = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    plot_matrices(path, {f"G ({head.correlation_source}), Pearson r = {r:.2f} with co-occurrence": g,
                         "training co-occurrence P(j | i)": co}, list(data.labels.names))
    return r
