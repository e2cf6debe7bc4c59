"""``cxrlab train`` and ``cxrlab cv`` from a recipe name or file: where the run goes is checked before
any data is read, then ``experiment.run`` (one model) or ``cross_validation.run_cv`` (one per fold)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..checkpoint import latest, read_info
from ..config import Recipe, load_recipe
from ..errors import CxrlabError
from ..paths import removed_if_empty, writable_dir
from .card import write_model_card
from .cross_validation import run_cv
from .experiment import RunResult, run

# what a training run writes into its --out folder (removed by --overwrite, so old and new never mix)
RUN_ENTRIES = ("best", "last", ".best.old", ".last.old", "report", "log.csv", "tensorboard", "mlflow.json")


def train(recipe: str, out: Path, overrides=(), resume: bool = False, overwrite: bool = False) -> RunResult:
    """Train the recipe (a name or YAML file, with ``key=value`` overrides) into the run folder ``out``:
    a new run, an interrupted one to ``resume``, or (``overwrite``) a finished one replaced."""
    loaded = load_recipe(recipe, overrides)
    with removed_if_empty(out):  # a run that fails before writing (no data, say) leaves no empty folder
        check_run_dir(out, resume=resume, overwrite=overwrite, recipe=loaded)
        result = run(loaded, out, resume=resume)
    if os.environ.get("RANK", "0") == "0":  # the model card page, from the files the run just wrote
        write_model_card(Path(out), Path(out) / "report" / "MODEL_CARD.md")
    return result


def cv(recipe: str, out: Path, overrides=(), repeats: int | None = None, folds: int | None = None) -> dict:
    """R×K patient-disjoint cross-validation of the recipe into ``out`` (default: the recipe's
    ``data.repeats`` × ``data.folds``); the summary dict, with ``report`` its Markdown file."""
    loaded = load_recipe(recipe, overrides)
    return run_cv(loaded, out, repeats=repeats or loaded.data.repeats, folds=folds or loaded.data.folds)


def check_run_dir(path: Path, resume: bool = False, overwrite: bool = False, recipe: Recipe | None = None) -> Path:
    """The ``--out`` of ``train`` (and ``demo``): a new run, an interrupted run to ``resume`` (with the
    same ``recipe`` but for the changes in ``SAFE_ON_RESUME``), or (``overwrite``) an old run whose
    checkpoints, logs and report are removed first so the new run cannot mix with them."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CxrlabError(f"run folder {path} is a file, not a folder; choose another --out")
    found = [name for name in RUN_ENTRIES if (path / name).exists()]
    if resume:
        if latest(path) is None and not overwrite:
            raise CxrlabError(f"--resume: nothing to resume in {path} (no last/checkpoint.json); drop --resume "
                              "to start a new run there, or add --overwrite to start afresh anyway")
        if latest(path) is not None and recipe is not None:
            check_same_recipe(latest(path), recipe)
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


# what may change when a run is resumed: how long it goes on, and where and how fast data is read
SAFE_ON_RESUME = ("train.epochs", "train.early_stop_patience", "data.num_workers", "data.cache_dir", "train.device")


def check_same_recipe(checkpoint: Path, recipe: Recipe) -> None:
    """Refuse to resume ``checkpoint`` with a recipe that differs from the one it was trained with, but for
    ``SAFE_ON_RESUME`` (more epochs, say): one line naming each changed field, old -> new."""
    saved = read_info(checkpoint).get("recipe")
    if not isinstance(saved, dict):
        return  # a checkpoint from before recipes were stored: nothing to compare with
    changed = [f"{key}: {old!r} -> {new!r}" for key, old, new in _differences(saved, recipe.to_dict())
               if key not in SAFE_ON_RESUME and key != "name"]
    if changed:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise CxrlabError(f"--resume: the recipe differs from the one {checkpoint.parent} was trained with ({shown}); "
                          f"resume with the same recipe and overrides (only {', '.join(SAFE_ON_RESUME)} may change), "
                          "or start a new run (--overwrite or another --out)")


def _differences(old, new, prefix: str = ""):
    """``(dotted key, old, new)`` for every leaf where two recipe dicts differ; a key the saved recipe
    lacks is left out (added to cxrlab after that run, with a default that keeps the old behaviour)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old, key=str):
            yield from _differences(old[key], new.get(key), f"{prefix}{key}.")
    elif old != new:
        yield prefix.rstrip("."), old, new
