"""``cxrlab train`` and ``cxrlab cv`` from a recipe name or file: where the run goes is checked before
any data is read, then ``experiment.run`` (one model) or ``cross_validation.run_cv`` (one per fold)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..checkpoint import latest
from ..config import load_recipe
from ..errors import CxrlabError
from ..paths import writable_dir
from .card import write_model_card
from .cross_validation import run_cv
from .experiment import RunResult, run

# what a training run writes into its --out folder (removed by --overwrite, so old and new never mix)
RUN_ENTRIES = ("best", "last", ".best.old", ".last.old", "report", "log.csv", "tensorboard", "mlflow.json")


def train(recipe: str, out: Path, overrides=(), resume: bool = False, overwrite: bool = False) -> RunResult:
    """Train the recipe (a name or YAML file, with ``key=value`` overrides) into the run folder ``out``:
    a new run, an interrupted one to ``resume``, or (``overwrite``) a finished one replaced."""
    loaded = load_recipe(recipe, overrides)
    check_run_dir(out, resume=resume, overwrite=overwrite)
    result = run(loaded, out, resume=resume)
    if os.environ.get("RANK", "0") == "0":  # the model card page, from the files the run just wrote
        write_model_card(Path(out), Path(out) / "report" / "MODEL_CARD.md")
    return result


def cv(recipe: str, out: Path, overrides=(), repeats: int | None = None, folds: int | None = None) -> dict:
    """R×K patient-disjoint cross-validation of the recipe into ``out`` (default: the recipe's
    ``data.repeats`` × ``data.folds``); the summary dict, with ``report`` its Markdown file."""
    loaded = load_recipe(recipe, overrides)
    return run_cv(loaded, out, repeats=repeats or loaded.data.repeats, folds=folds or loaded.data.folds)


def check_run_dir(path: Path, resume: bool = False, overwrite: bool = False) -> Path:
    """The ``--out`` of ``train``: a new run, an interrupted run to ``resume``, or (``overwrite``) an
    old run whose checkpoints, logs and report are removed first so the new run cannot mix with them."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CxrlabError(f"run folder {path} is a file, not a folder; choose another --out")
    found = [name for name in RUN_ENTRIES if (path / name).exists()]
    if resume:
        if latest(path) is None and not overwrite:
            raise CxrlabError(f"--resume: nothing to resume in {path} (no last/checkpoint.json); drop --resume "
                              "to start a new run there, or add --overwrite to start afresh anyway")
    elif found and not overwrite:
        raise CxrlabError(f"{path} already holds a run ({', '.join(found)}); use --resume to continue it, "
                          "--overwrite to replace it, or choose another --out")
    writable_dir(path, "run folder")
    # under torchrun every rank checks, one removes
    if overwrite and not (resume and latest(path) is not None) and os.environ.get("RANK", "0") == "0":
        for name in found:
            target = path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    return path
