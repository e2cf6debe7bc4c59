"""A run's checkpoints from the trainer's side: ``save`` writes ``last/`` (and ``best/``) with
everything an exact resume needs (weights, optimiser, schedule, EMA, grad scaler, every rank's RNG
states, selection state and history); ``restore`` puts a trainer back exactly there; ``load_weights``
loads only the selected model. The file format itself is ``cxrlab.checkpoint``'s."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..config import Recipe
from ..errors import CxrlabError
from ..models import describe_backbones
from . import distributed as dist
from .run_log import public

log = logging.getLogger("cxrlab.trainer")


def save(trainer, improved: bool) -> None:
    """Write ``last/`` (and ``best/`` when improved) from rank 0; every rank joins the RNG gather."""
    rng = ckpt.capture_rng()
    gathered = {}
    for key, tensor in rng.items():
        for rank, t in enumerate(dist.all_gather_list(tensor)):
            gathered[f"rng.{rank}.{key}"] = t
    if trainer.dist.is_main:
        weights = ckpt.module_tensors({"model": trainer.model, "regime": trainer.regime.modules,
                                       "objective": trainer.objective})
        optim_tensors, optim_structure = ckpt.flatten_optimizer(trainer.optimizer.state_dict())
        state = {**optim_tensors, **gathered}
        if trainer.ema is not None:
            state.update(ckpt.module_tensors({"ema": trainer.ema.module}))
            state["ema_rng"] = trainer.ema._sr_generator.get_state()
        structure = {"optimizer": optim_structure, "scheduler": trainer.scheduler.state_dict(),
                     "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
                     "world_size": trainer.dist.world_size}
        info = {"recipe": trainer.recipe.to_dict(), "labels": trainer.label_names, "thresholds": None,
                "metrics": public(trainer.history[-1]), "epoch": trainer.epoch, "step": trainer.step,
                "ema": trainer.ema is not None,
                "trainer": {**trainer.best, "history": trainer.history},
                "torch": torch.__version__}
        text = trainer.model.head.text_identity
        if text is not None:  # prototype head: the text encoder behind its stored label vectors
            info["label_text"] = text
        ckpt.save_checkpoint(trainer.out_dir / "last", weights, state, structure, info,
                             also=trainer.out_dir / "best" if improved else None)
    dist.barrier()


def restore(trainer, folder: Path) -> None:
    """Put the trainer back exactly where the checkpoint left it (weights, optimiser, schedule,
    EMA, grad scaler, RNG states, selection state and history)."""
    info = ckpt.read_info(folder)
    check_same_backbones(info, trainer.recipe, folder)
    weights = ckpt.read_tensors(folder, ckpt.MODEL_FILE, info)
    state, meta = ckpt.read_tensors(folder, ckpt.STATE_FILE, info, with_metadata=True)
    for prefix, module in (("model", trainer.model), ("regime", trainer.regime.modules),
                           ("objective", trainer.objective)):
        ckpt.load_module(module, _strip(weights, prefix), folder / ckpt.MODEL_FILE)
    structure = ckpt._decode(json.loads(meta["structure"]))
    try:
        trainer.optimizer.load_state_dict(ckpt.unflatten_optimizer(state, structure["optimizer"]))
    except (ValueError, KeyError) as exc:
        raise CxrlabError(f"{folder / ckpt.STATE_FILE}: optimiser state does not fit this run: {exc}") from None
    trainer.scheduler.load_state_dict(structure["scheduler"])
    if trainer.scaler is not None and structure.get("scaler"):
        trainer.scaler.load_state_dict(structure["scaler"])
    if trainer.ema is not None:
        if not info.get("ema"):
            raise CxrlabError(f"{folder}: the checkpoint has no EMA weights but train.ema is set")
        ckpt.load_module(trainer.ema.module, _strip(state, "ema"), folder / ckpt.STATE_FILE)
        if "ema_rng" in state:
            trainer.ema._sr_generator.set_state(state["ema_rng"])
    rng = _strip(state, f"rng.{trainer.dist.rank}") or _strip(state, "rng.0")
    if rng:
        ckpt.restore_rng(rng)
    saved = info["trainer"]
    trainer.history = saved["history"]
    trainer.best = {k: saved[k] for k in ("score", "epoch", "bad_epochs", "stopped")}
    trainer.epoch, trainer.step = int(info["epoch"]), int(info["step"])
    if info.get("recipe") != trainer.recipe.to_dict():
        log.warning("resuming %s with a recipe that differs from the checkpoint's", folder)


def load_weights(trainer, folder: Path) -> None:
    """Load a checkpoint's model (and EMA) weights only: the selected model after fit."""
    info = ckpt.read_info(folder)
    ckpt.load_module(trainer.model, ckpt.read_tensors(folder, ckpt.MODEL_FILE, info, prefix="model"),
                     folder / ckpt.MODEL_FILE)
    if trainer.ema is not None and info.get("ema"):
        ckpt.load_module(trainer.ema.module, ckpt.read_tensors(folder, ckpt.STATE_FILE, info, prefix="ema"),
                         folder / ckpt.STATE_FILE)


def check_same_backbones(info: dict, recipe: Recipe, folder: Path) -> None:
    """Resuming needs the checkpoint's backbones (names, output strides, order): say so by field."""
    saved_model = (info.get("recipe") or {}).get("model")
    if saved_model is None:
        return
    saved, wanted = describe_backbones(saved_model), describe_backbones(recipe.model)
    if saved != wanted:
        def show(specs):
            return [name if stride is None else f"{name} (output_stride {stride})" for name, stride in specs]

        raise CxrlabError(f"{folder}: the checkpoint's model.backbones is {show(saved)} but this recipe's is "
                          f"{show(wanted)}; resume with the checkpoint's recipe or start a new run")


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

