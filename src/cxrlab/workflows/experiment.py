"""One experiment from a recipe: prepared data -> split -> train -> thresholds -> test report.

This is the single place where the data layer, the model, the objective, the regime, the trainer and
the evaluation meet; the CLI commands ``train``, ``cv``, ``compare`` and ``demo`` all call ``run``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from .. import checkpoint as ckpt
from ..config import Recipe
from ..data.dataset import ImageSet
from ..data.prepared import PreparedData, prepare_data, split_rows  # noqa: F401 (re-exported for callers)
from ..data.transforms import build_augment, parse_spec
from ..engine import distributed as dist
from ..engine.run_log import check_loggers, finish_run
from ..engine.trainer import Trainer, make_loader, seed_everything
from ..evaluation.protocol import protocol
from ..errors import CxrlabError, unknown
from ..labels import label_cooccurrence
from ..losses.base import LossContext, Objective
from ..metrics import fit_thresholds, multilabel_report
from ..metrics.study import study_level, study_report
from ..metrics.subgroups import subgroup_report
from ..models import build_from_config, check_model, heads_where
from ..models.heads.base import Capability
from ..models.parts import freeze, freeze_names, init_from_spec, load_parts
from ..models.text import attach_label_text, check_label_text
from ..registry import HEADS, LOSSES, REGIMES
from .run_header import run_header, say_header
from .run_split import check_split, split_record, write_split


@dataclass
class RunResult:
    """What one training run produced: ``report`` (report.md), the test ``metrics`` (metrics.json's
    dict), the selected ``checkpoint`` folder, the trained ``model`` and the per-epoch ``history``."""

    report: Path
    metrics: dict
    checkpoint: Path
    model: nn.Module
    history: list | None


def check_parts(recipe: Recipe) -> None:
    """Fail on a misspelt backbone, head, loss, regime or argument before any data is prepared
    (preparing a real dataset can take an hour)."""
    check_model(recipe.model)  # backbone name(s), head, head arguments, one map or several
    _check_init_and_freeze(recipe.model)
    check_label_text(recipe)  # DWML prototype head: text encoder name, arguments, hf: model on disk
    for name, value in recipe.loss.items():
        accepted = [p for p in inspect.signature(LOSSES.get(name)).parameters if p != "ctx"]
        for key in (value if isinstance(value, dict) else {}):
            if key != "weight" and key not in accepted:
                raise unknown(f"argument of loss {name!r}", key, ["weight", *accepted])
    regime_cls = REGIMES.get(recipe.regime.name)
    accepted = [p for p in inspect.signature(regime_cls).parameters
                if p not in ("weak", "strong", "feature_dim", "label_names")]
    for key in recipe.regime.args:
        if key not in accepted and key != "feature_dim":
            raise unknown(f"regime.args key for regime {recipe.regime.name!r}", key, accepted)
    check_contracts(recipe)
    check_loggers(recipe.train)  # a misspelt logger, or mlflow not installed
    parse_spec(recipe.augment.weak)
    parse_spec(recipe.augment.strong)


def check_contracts(recipe: Recipe) -> None:
    """Refuse a head, regime and loss terms that do not fit together, in one line naming both sides and
    the heads (or regimes) that would fit: each part declares what it provides and requires."""
    head, regime = recipe.model.head, recipe.regime.name
    head_cls, regime_cls = HEADS.get(head), REGIMES.get(regime)
    if regime_cls.one_feature_map and head_cls.takes_several_maps():
        fits = heads_where(lambda h: not h.takes_several_maps())
        raise CxrlabError(f"regime {regime!r} works on one backbone's feature map, which head {head!r} does not "
                          f"take (it takes several; model.backbones lists {len(recipe.model.backbones)}); heads that "
                          f"do: {', '.join(fits)}")
    from_head = head_cls.extras_for(recipe.model.head_args)
    missing = regime_cls.requires - from_head
    if missing:
        raise CxrlabError(f"regime {regime!r} needs extras {', '.join(sorted(missing))}, which head {head!r} does not "
                          f"provide; heads that do: {', '.join(HEADS.providers(missing)) or 'none'}")
    available = from_head | regime_cls.extras_for(recipe.regime.args)
    for name in recipe.loss:
        missing = LOSSES.get(name).requires - available
        if not missing:
            continue
        keys = ", ".join(sorted(missing))
        heads, regimes = HEADS.providers(missing), REGIMES.providers(missing)
        if heads:
            args = f" with head_args {dict(recipe.model.head_args)}" if head in heads else ""
            raise CxrlabError(f"loss {name!r} needs extras {keys}, which head {head!r}{args} does not provide; "
                              f"heads that do: {', '.join(heads)}")
        raise CxrlabError(f"loss {name!r} needs extras {keys}, which regime {regime!r} does not provide"
                          + (f" with regime.args {dict(recipe.regime.args)}" if regime in regimes else "")
                          + f"; regimes that do: {', '.join(regimes) or 'none'}")


def build_parts(recipe: Recipe, data: PreparedData, train_rows: np.ndarray, fold: tuple[int, int] | None = None):
    """Model, objective and regime for a recipe, with the loss context from the training rows; the model
    starts from ``model.init_from`` (of this ``fold`` when its path says ``{fold}``) and has
    ``model.freeze`` frozen."""
    seed_everything(recipe.train.seed)  # model init and regime modules are part of the seeded run
    m = recipe.model
    model = build_from_config(m, len(data.labels), image_size=recipe.data.image_size)
    _init_and_freeze(model, m, fold)
    full = data.full_target[train_rows] if data.full_target is not None else None
    ctx = LossContext.from_targets(data.labels.names, data.target[train_rows], data.mask[train_rows], full)
    model.head.set_cooccurrence(ctx.cooccurrence)  # a no-op for heads without the cooccurrence capability
    attach_label_text(model, recipe, data.labels.names)  # label text vectors for the prototype head (DWML)
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


def _check_init_and_freeze(m) -> None:
    """The form of model.freeze / model.init_from, and that a fixed init_from checkpoint exists."""
    freeze_names(m.freeze)
    spec = init_from_spec(m.init_from)
    if spec is not None and "{fold}" not in spec[0]:
        ckpt.find_checkpoint(Path(spec[0]))


def _init_and_freeze(model: nn.Module, m, fold: tuple[int, int] | None) -> None:
    spec = init_from_spec(m.init_from)
    if spec is not None:
        path, parts = spec
        if "{fold}" in path:
            if fold is None:
                raise CxrlabError(f"model.init_from {path!r} names {{fold}}, which only cv and compare --cv give")
            path = path.replace("{fold}", f"r{fold[0]}f{fold[1]}")
        folder = ckpt.find_checkpoint(Path(path))
        info = ckpt.read_info(folder)
        load_parts(model, ckpt.read_tensors(folder, ckpt.MODEL_FILE, info, prefix="model"), parts, str(folder))
    freeze(model, m.freeze)


def run(recipe: Recipe, out_dir: Path, resume: bool = False, data: PreparedData | None = None,
        manifest: pd.DataFrame | None = None, fold: tuple[int, int] | None = None,
        progress: bool = True) -> "RunResult":
    """Train on the train part, select on val, fit thresholds on val, and report on test."""
    from ..evaluation.report import write_report  # lazy: start-up time (matplotlib)

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
    # the images of each part, recorded so that cv/compare reuse this run only on the same split
    record = split_record(data.index["path"].to_numpy(), parts, manifest, fold, str(recipe.data.split))
    if resume:
        check_split(out_dir, record, required=False)  # a run from before the record resumes as it did
    if dist.is_main():
        write_split(out_dir, record)
    model, objective, regime = build_parts(recipe, data, parts["train"], fold)

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
    if dist.is_main():
        say_header(run_header(recipe, data, parts, model, trainer.device, trainer.amp_dtype, out_dir,
                              trainer.dist.world_size, fold))
    fit = trainer.fit(loaders["train"], loaders["val"], resume=resume)

    names = list(data.eval_labels.names)
    val_probs, val_target, val_mask = trainer.predict(loaders["val"], "score val")
    test_probs, test_target, test_mask = trainer.predict(loaders["test"], "score test")
    cols = data.eval_columns
    val_probs, val_target, val_mask = val_probs[:, cols], val_target[:, cols], val_mask[:, cols]
    test_probs, test_target, test_mask = test_probs[:, cols], test_target[:, cols], test_mask[:, cols]
    thresholds = fit_thresholds(val_probs, val_target, val_mask, method=recipe.eval.threshold)
    metrics = multilabel_report(test_probs, test_target, test_mask, names, thresholds=thresholds,
                                bootstrap=recipe.eval.bootstrap, ci=recipe.eval.ci, seed=recipe.train.seed,
                                min_positives=recipe.eval.min_positives,
                                exclude_unreliable=recipe.eval.exclude_unreliable)
    metrics["threshold_source"] = f"per label, fitted on the validation part ({recipe.eval.threshold})"
    metrics["split_sizes"] = {name: int(len(rows)) for name, rows in parts.items()}
    metrics["selection"] = {"epoch": fit.best_epoch, "on": f"val_{recipe.train.select_on}"}  # the kept weights
    if recipe.eval.subgroups:  # by sex / age band / view of the test images, where the source gives them
        e = recipe.eval
        metrics["subgroups"] = subgroup_report(test_probs, test_target, test_mask, names, data.index.iloc[parts["test"]],
                                               e.subgroups, e.age_bands, e.min_positives, e.bootstrap, e.ci,
                                               recipe.train.seed)
    metrics.update(_study_and_protocol(recipe, data, parts, manifest, fold, names,
                                       (val_probs, val_target, val_mask), (test_probs, test_target, test_mask)))
    if fit.epoch_stats:
        metrics["training"] = fit.epoch_stats
        # the last epoch's regime statistics (e.g. MPC pseudo-label precision/recall) at the top level,
        # so cross-validation and comparisons aggregate them like any metric
        metrics.update({k: v for k, v in fit.epoch_stats[-1].items() if k != "epoch"})
    if not dist.is_main():  # every rank holds the gathered predictions; one writes the report
        dist.barrier()
        return RunResult(out_dir / "report" / "report.md", metrics, fit.checkpoint, trainer.model,
                         fit.history)
    thresholds_all = np.full(len(data.labels), 0.5)
    thresholds_all[data.eval_columns] = thresholds
    ckpt.set_thresholds(fit.checkpoint, thresholds_all.tolist())
    train_rows = parts["train"]
    head = trainer.model.head
    if Capability.CORRELATION in head.capabilities:  # label-level heads: how the learned G relates to the data
        (out_dir / "report").mkdir(parents=True, exist_ok=True)
        metrics["g_vs_cooccurrence_r"] = _plot_correlation(out_dir / "report" / "correlation.png", head, data,
                                                           train_rows)
    report = write_report(out_dir / "report", metrics, test_probs, test_target, test_mask, names,
                          config=recipe.to_dict(), history=fit.history,
                          train_targets=data.eval_target[train_rows][:, cols],
                          train_mask=data.eval_mask[train_rows][:, cols])
    predictions = pd.DataFrame(test_probs, columns=names)
    predictions.insert(0, "path", data.index["path"].to_numpy()[parts["test"]])
    predictions.to_csv(out_dir / "report" / "test_predictions.csv", index=False, float_format="%.6f")
    finish_run(recipe, out_dir, metrics, out_dir / "report")  # test metrics and the report to MLflow
    dist.barrier()
    return RunResult(Path(report), metrics, fit.checkpoint, trainer.model, fit.history)


def _study_and_protocol(recipe: Recipe, data: PreparedData, parts: dict, manifest, fold, names, val, test) -> dict:
    """metrics.json's ``study`` block (when ``eval.level`` asks for it; thresholds fitted on the validation
    part's studies) and its ``protocol`` (what the report's first line says)."""
    e, d = recipe.eval, recipe.data
    ids = data.index["study_id"].to_numpy(dtype=str) if "study_id" in data.index.columns else None
    out = {}
    if study_level(e.level, ids):
        out["study"] = study_report(*test, ids[parts["test"]], names, how=e.study_aggregation,
                                    val=(*val, ids[parts["val"]]), threshold_rule=e.threshold,
                                    bootstrap=e.bootstrap, ci=e.ci, seed=recipe.train.seed,
                                    min_positives=e.min_positives, exclude_unreliable=e.exclude_unreliable)
        out["study"]["threshold_source"] = f"per label, fitted on the validation part's studies ({e.threshold})"
    if fold is None:
        split = str(d.split)
    else:
        split = f"{manifest['repeat'].nunique()}×{manifest['fold'].nunique()} CV"
        split += f" from folds file {Path(d.folds_file).name}" if d.folds_file else ""
    level = f"image + study ({e.study_aggregation} of a study's images)" if "study" in out else "image"
    out["protocol"] = protocol(split, level, d.image_size, str(d.resize), str(d.policy), len(names),
                               data.index.iloc[parts["test"]], run=None if fold is None else f"r{fold[0]}f{fold[1]}")
    return out


def _plot_correlation(path: Path, head, data: PreparedData, train_rows: np.ndarray) -> float:
    """The head's learned global label correlation G next to the training labels' co-occurrence
    P(j | i), both row-normalised with the diagonal blanked, so their off-diagonal structure compares.
    Returns the Pearson correlation of their off-diagonal entries (NaN if either is constant)."""
    from ..evaluation.plots import plot_matrices  # lazy: start-up time (matplotlib)

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
