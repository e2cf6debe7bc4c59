"""The command line's verbs as Python functions, each a thin call into the workflow its command runs:

    import cxrlab

    run = cxrlab.train("demo", "runs/demo", **{"train.epochs": 1, "data.source": "synthetic:600"})
    run.metrics["macro_auc"], run.checkpoint, run.model          # a RunResult
    cxrlab.evaluate(run.checkpoint, "csv:labels.csv", "runs/eval").metrics
    cxrlab.predict(run.checkpoint, ["scans/"], "predictions.csv").table    # a pandas DataFrame
    cxrlab.export(run.checkpoint, "model.onnx").parity

Overrides are keyword arguments named by the recipe key, dotted for a nested one: exactly the command
line's ``KEY=VALUE`` (``**{"train.epochs": 1}`` is ``train.epochs=1``; ``loss={"bce": 1.0}`` replaces
the recipe's loss as ``loss={bce: 1.0}`` does). Each value goes through the same parser, so a misspelt
key or a wrong type is the same one-line error naming the closest valid key.

Every verb imports its workflow when it is called, so ``import cxrlab`` stays cheap (no torch) and each
verb loads only what it needs (``predict`` with a ``model.onnx`` runs on ONNX Runtime without torch).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import CxrlabError

if TYPE_CHECKING:  # only for the annotations: importing them here would import torch
    import pandas as pd

    from .workflows.experiment import RunResult

PathLike = str | os.PathLike


@dataclass
class CVResult:
    """``cv``: ``metrics`` holds mean ± std over the folds (``{metric: {mean, std, n}}``, ``per_label``,
    ``n_reports``; summary.json's dict), ``report`` is summary.md, ``run_dirs`` the folds' run folders."""

    report: Path
    metrics: dict
    run_dirs: list[Path]


@dataclass
class ComparisonResult:
    """``compare``: comparison.md (``report``), comparison.json (``table``: recipe -> metric -> {mean, std,
    n}) and its contents (``results``)."""

    report: Path
    table: Path
    results: dict


@dataclass
class EvaluationResult:
    """``evaluate``: report.md and its ``metrics`` (metrics.json's dict)."""

    report: Path
    metrics: dict


@dataclass
class PredictionResult:
    """``predict``: the CSV written and its ``table`` (path, a probability per label, ``<label>_positive``,
    ``error``: empty, or why an image could not be read)."""

    csv: Path
    table: pd.DataFrame

    @property
    def failed(self) -> list[str]:
        """The inputs that could not be read."""
        if "error" not in self.table:
            return []
        return self.table.loc[self.table["error"].fillna("").astype(bool), "path"].astype(str).tolist()


@dataclass
class ExportResult:
    """``export``: the ONNX file, its sidecar (what inference needs to know) and the parity check
    against PyTorch (``max_abs_diff``, ``n``, ``tolerance``)."""

    onnx: Path
    sidecar: Path
    parity: dict


@dataclass
class CalibrationResult:
    """``calibrate``: the calibrated copy of the checkpoint and its ``calibration`` record (source, n,
    method, the labels refitted, thresholds and temperatures)."""

    checkpoint: Path
    record: dict


def train(recipe: PathLike, out: PathLike, *, resume: bool = False, overwrite: bool = False,
          **overrides: Any) -> RunResult:
    """``cxrlab train``: train one model from a recipe (a name or a YAML file) into the run folder ``out``;
    a finished run there is an error unless ``overwrite``, an interrupted one continues with ``resume``."""
    from .workflows.train import train as run_train  # lazy: keeps `import cxrlab` free of torch

    return run_train(str(recipe), Path(out), override_args(overrides), resume=resume, overwrite=overwrite)


def cv(recipe: PathLike, out: PathLike, *, repeats: int | None = None, folds: int | None = None,
       **overrides: Any) -> CVResult:
    """``cxrlab cv``: R×K patient-disjoint cross-validation, one model per fold (default R×K: the recipe's
    ``data.repeats`` × ``data.folds``; a frozen split: ``**{"data.folds_file": "folds.csv"}``)."""
    from .workflows.train import cv as run_cv  # lazy: keeps `import cxrlab` free of torch

    summary = run_cv(str(recipe), Path(out), override_args(overrides), repeats=repeats, folds=folds)
    report, run_dirs = Path(summary.pop("report")), [Path(p) for p in summary.pop("run_dirs")]
    return CVResult(report, summary, run_dirs)


def compare(recipes: list[PathLike], out: PathLike, *, data: str | None = None, cv: tuple[int, int] | None = None,
            seeds: int | None = None, reference: str | None = None, resamples: int = 1000,
            tune: dict[str, list] | None = None, paired: str = "folds", **overrides: Any) -> ComparisonResult:
    """``cxrlab compare``: several recipes on identical data and splits (``cv=(R, K)`` folds, or ``seeds``
    runs), side by side, each tested against ``reference`` (default: the first) on the same images.
    ``overrides`` apply to every recipe; ``data`` is every recipe's source; ``tune``, e.g.
    ``{"optim.lr": [1e-3, 3e-4]}``, is ``--tune``: every recipe searches that grid, chosen on validation.
    ``paired`` is ``--paired``: ``"folds"`` tests the mean of per-fold differences (the table's number),
    ``"pooled"`` the pooled predictions."""
    from .workflows.cross_validation import compare as run_compare  # lazy: keeps `import cxrlab` free of torch

    if paired not in ("folds", "pooled"):
        raise CxrlabError(f"compare: paired={paired!r}; choose 'folds' (the mean of per-fold differences) or 'pooled'")
    if isinstance(recipes, (str, os.PathLike)):
        raise CxrlabError(f"compare takes a list of recipes, got {str(recipes)!r}; e.g. compare(['a', 'b'], out)")
    grid = [f"{key}={','.join(_yaml_value(key, v) for v in values)}" for key, values in (tune or {}).items()]
    report, table = run_compare([str(r) for r in recipes], Path(out), data=data, cv=cv, seeds=seeds,
                                overrides=override_args(overrides), reference=reference, resamples=resamples,
                                tune=grid, paired=paired)[:2]
    return ComparisonResult(Path(report), Path(table), json.loads(Path(table).read_text()))


def evaluate(model: PathLike, data: str, out: PathLike, *, policy: str | None = None, split: str = "all",
             overwrite: bool = False) -> EvaluationResult:
    """``cxrlab evaluate``: score a checkpoint (or run folder, or ONNX export) on the labelled source ``data``
    (``KIND:LOCATION``) at the model's own thresholds; the report goes to the folder ``out``."""
    from .workflows.evaluate import evaluate_checkpoint  # lazy: keeps `import cxrlab` free of torch

    report = Path(evaluate_checkpoint(Path(model), data, Path(out), policy=policy, split=split, overwrite=overwrite))
    return EvaluationResult(report, json.loads((report.parent / "metrics.json").read_text()))


def predict(model: PathLike, inputs: PathLike | list[PathLike], out: PathLike, *, batch_size: int = 32,
            overwrite: bool = False, format: str = "csv", generate_uids: bool = False) -> PredictionResult:
    """``cxrlab predict``: probabilities and thresholded labels for image files and folders, written to the
    CSV ``out``; an unreadable image is a row with its ``error``, not an exception (see ``.failed``).
    ``model``: a checkpoint, a run folder, or a ``model.onnx`` (ONNX Runtime; torch is not imported).
    ``format``: json, dicom-sr (``out`` a folder) or fhir write that instead, as ``--format`` does."""
    from .workflows.predict import predict_files  # lazy: torch only for a checkpoint, not a model.onnx

    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    table = predict_files(Path(model), [Path(p) for p in inputs], Path(out), batch_size=batch_size,
                          overwrite=overwrite, format=format, generate_uids=generate_uids)
    return PredictionResult(Path(out), table)


def export(model: PathLike, out: PathLike, *, check: list[PathLike] | None = None, tolerance: float = 1e-4,
           overwrite: bool = False) -> ExportResult:
    """``cxrlab export``: an ONNX file ``out`` and its sidecar ``out.json``, refused (nothing written) unless
    ONNX Runtime matches PyTorch within ``tolerance`` on ``check`` images (default: synthetic ones)."""
    # lazy: torch and onnx, for this verb only
    from .inference.onnx_backend import sidecar_path
    from .workflows.deploy import export as run_export

    out = Path(out)
    sidecar = run_export(Path(model), out, check=[Path(p) for p in check] if check else None, tolerance=tolerance,
                         overwrite=overwrite)
    return ExportResult(out, sidecar_path(out), sidecar["parity"])


def calibrate(model: PathLike, data: str, out: PathLike, *, temperature: bool = False, method: str = "f1",
              policy: str | None = None, split: str = "all") -> CalibrationResult:
    """``cxrlab calibrate``: a copy of the checkpoint at ``out`` with per-label thresholds (``method``: f1 or
    youden) and, with ``temperature``, a per-label temperature refitted on the labelled source ``data``."""
    from .workflows.deploy import calibrate as run_calibrate  # lazy: keeps `import cxrlab` free of torch

    record = run_calibrate(Path(model), data, Path(out), temperature=temperature, method=method, policy=policy,
                           split=split)
    return CalibrationResult(Path(out), record)


def override_args(overrides: dict[str, Any]) -> list[str]:
    """Keyword overrides as the command line's ``KEY=VALUE`` strings: each value written as flow YAML, which
    ``load_recipe`` reads back as the same value (``"null"`` stays a string, ``1e-5`` a float)."""
    return [f"{key}={_yaml_value(key, value)}" for key, value in overrides.items()]


def _yaml_value(key: str, value: Any) -> str:
    try:
        text = yaml.safe_dump(_plain(value), default_flow_style=True, width=float("inf"), allow_unicode=True)
    except yaml.YAMLError:
        raise CxrlabError(f"override {key}={value!r}: not a plain value (a str, number, bool, None, list or dict "
                          "of them)") from None
    return text.strip().removesuffix("\n...").strip()  # a lone scalar is a document closed by "..."


def _plain(value: Any) -> Any:
    """Paths as strings, tuples and arrays as lists, array scalars as numbers, down the tree (YAML's safe
    writer takes none of them)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy / torch
        return _plain(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
