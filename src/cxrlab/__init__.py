"""cxrlab: multi-label chest X-ray classification.

The command line's verbs are functions (cxrlab.api; overrides as ``**{"train.epochs": 1}``):

    train, cv, compare                  a recipe's run, cross-validation, recipes side by side
    evaluate, predict, export, calibrate  what a trained model does
    RunResult, CVResult, ComparisonResult, EvaluationResult, PredictionResult, ExportResult,
    CalibrationResult                   what they return

The parts a custom training loop needs are importable from the top level too (everything is loaded on
first use, so ``import cxrlab`` stays cheap):

    load_recipe, Recipe                 recipes (cxrlab.config)
    parse_source, read_image            data sources and image decoding (cxrlab.data)
    ImageSet, prepare_data, split_rows  cached images as a torch Dataset; a recipe's data and split
    build_model, HEADS, LOSSES, REGIMES models and registered parts
    Objective, LossContext              the weighted sum of loss terms (cxrlab.losses)
    Trainer                             the training loop (cxrlab.engine)
    Predictor, load_model               inference (cxrlab.inference, cxrlab.checkpoint)
    metrics                             functional metrics (cxrlab.metrics)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_recipe": "cxrlab.config", "Recipe": "cxrlab.config",
    "parse_source": "cxrlab.data.sources", "read_image": "cxrlab.data.images",
    "ImageSet": "cxrlab.data.dataset", "prepare_data": "cxrlab.data.prepared", "split_rows": "cxrlab.data.prepared",
    "build_model": "cxrlab.models", "HEADS": "cxrlab.registry", "LOSSES": "cxrlab.registry",
    "REGIMES": "cxrlab.registry", "Objective": "cxrlab.losses.base", "LossContext": "cxrlab.losses.base",
    "Trainer": "cxrlab.engine.trainer", "Predictor": "cxrlab.inference.predictor",
    "load_model": "cxrlab.checkpoint", "Output": "cxrlab.output",
    **dict.fromkeys(["train", "cv", "compare", "evaluate", "predict", "export", "calibrate", "CVResult",
                     "ComparisonResult", "EvaluationResult", "PredictionResult", "ExportResult",
                     "CalibrationResult"], "cxrlab.api"),
    "RunResult": "cxrlab.workflows.experiment",
}

__all__ = [*_EXPORTS, "metrics"]


def __getattr__(name: str):
    if name == "metrics":
        return importlib.import_module("cxrlab.metrics")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cxrlab' has no attribute {name!r}")
