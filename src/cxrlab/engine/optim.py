"""Optimiser and per-step learning-rate schedule from a recipe's ``optim`` and ``schedule`` sections.

Parameter groups, each part of the network on its own (so a recipe can train a new head faster than a
pretrained backbone, as ADD-GCN and GL-MLL do; see ``optim.*_lr_mult``):
  * for each named part (``backbone``, ``head``, ``regime``; a plain module list is one unnamed part):
    weights at ``lr * <part>_lr_mult`` with weight decay, and biases and normalisation parameters (every
    parameter with ≤ 1 dimension) at the same lr without decay, since decaying them only fights the
    normalisation (as timm and most reference code do);
  * each loss term's own trainable parameters (e.g. ROLE's label matrix) at ``lr * term.lr_multiplier``
    (default 1) and ``term.weight_decay`` (default 0: a label estimate is not a network weight).
Frozen parameters (``requires_grad`` off, see ``model.freeze``) are in no group.
The schedule is a ``LambdaLR`` stepped once per optimiser step, so warm-up can end mid-epoch; the new
parts (head, regime) may have a warm-up of their own (``optim.new_params_warmup_epochs``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..config import OptimConfig, Optimizer, Schedule, ScheduleConfig, choose
from ..errors import CxrlabError
from ..models import CxrModel

# parts whose parameters a recipe trains from scratch even when the backbone is pretrained
NEW_PARTS = ("head", "regime")


def part_multipliers(cfg: OptimConfig) -> dict[str, float]:
    """The learning-rate multiplier of each named part."""
    return {"backbone": cfg.backbone_lr_mult, "head": cfg.head_lr_mult, "regime": cfg.regime_lr_mult}


def model_parts(model: nn.Module, regime_modules: nn.Module | None = None) -> dict[str, nn.Module]:
    """``{"backbone", "head", "regime"}`` of a cxrlab model (a ``CxrModel``: backbone + head); any other
    module is one part, ``model``, trained at the base learning rate."""
    if isinstance(model, CxrModel):
        parts = {"backbone": model.backbone, "head": model.head}
    else:
        parts = {"model": model}
    if regime_modules is not None:
        parts["regime"] = regime_modules
    return parts


def param_groups(modules: dict[str, nn.Module] | Iterable[nn.Module], objective: nn.Module | None, lr: float,
                 weight_decay: float, multipliers: dict[str, float] | None = None) -> list[dict]:
    """Optimiser parameter groups (named by their ``name`` key, e.g. ``head.decay``; with a plain list of
    modules ``decay`` / ``no_decay``); empty groups are left out. A parameter shared by two parts goes to
    the first. Each group also records its ``part`` and its ``lr_mult``."""
    parts = modules if isinstance(modules, dict) else {"": nn.ModuleList(list(modules))}
    multipliers = multipliers or {}
    seen: set[int] = set()
    groups = []
    for part, module in parts.items():
        decay, no_decay = [], []
        for _, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if p.ndim <= 1 else decay).append(p)
        mult = float(multipliers.get(part, 1.0))
        prefix = f"{part}." if part else ""
        groups += [{"name": f"{prefix}decay", "params": decay, "lr": lr * mult, "weight_decay": weight_decay,
                    "part": part, "lr_mult": mult},
                   {"name": f"{prefix}no_decay", "params": no_decay, "lr": lr * mult, "weight_decay": 0.0,
                    "part": part, "lr_mult": mult}]
    terms = getattr(objective, "terms", {}) if objective is not None else {}
    for term_name, term in terms.items():
        params = [p for p in term.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        mult = float(getattr(term, "lr_multiplier", 1.0))
        groups.append({"name": f"loss.{term_name}", "params": params, "lr": lr * mult,
                       "weight_decay": float(getattr(term, "weight_decay", 0.0)), "part": "loss", "lr_mult": mult})
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: OptimConfig, modules: dict[str, nn.Module] | Iterable[nn.Module],
                    objective: nn.Module | None = None, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW, Adam (L2 weight decay, as several CXR papers train) or SGD (momentum, optional Nesterov)
    over :func:`param_groups` (``modules``: named parts, see :func:`model_parts`, or a list).

    ``fused`` picks PyTorch's fused CUDA kernels (AdamW), worth having when every parameter is on a GPU.
    """
    for part, mult in part_multipliers(cfg).items():
        if not (math.isfinite(mult) and mult >= 0):
            raise CxrlabError(f"optim.{part}_lr_mult must be a finite number >= 0, got {mult!r}")
    groups = param_groups(modules, objective, cfg.lr, cfg.weight_decay, part_multipliers(cfg))
    if not groups:
        raise CxrlabError("nothing to train: the model, regime and loss have no trainable parameters")
    name = choose(Optimizer, cfg.name, "optim.name")  # a recipe's is checked at load; a hand-built one is not
    if name is Optimizer.SGD:
        if cfg.nesterov and cfg.momentum <= 0:
            raise CxrlabError("optim.nesterov needs optim.momentum > 0")
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    adam = torch.optim.AdamW if name is Optimizer.ADAMW else torch.optim.Adam
    return adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def lr_factor(cfg: ScheduleConfig, step: int, epochs: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate for optimiser step ``step`` (0-based).

    Linear warm-up over ``warmup_epochs`` (may be fractional) from 1/warm-up to 1, then ``cosine``
    (to 0 at the last step), ``step`` (× gamma every ``step_size`` epochs, counted from the start) or
    ``constant``.
    """
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total, int(round(cfg.warmup_epochs * steps_per_epoch)))
    if step < warmup:
        return (step + 1) / warmup
    name = choose(Schedule, cfg.name, "schedule.name")
    if name is Schedule.CONSTANT:
        return 1.0
    if name is Schedule.COSINE:
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.step_size <= 0:  # step
        raise CxrlabError(f"schedule.step_size must be > 0, got {cfg.step_size}")
    return cfg.gamma ** ((step // max(1, steps_per_epoch)) // cfg.step_size)


def build_scheduler(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, epochs: int,
                    steps_per_epoch: int, new_params_warmup_epochs: float = 0.0
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR``; it scales every group, so the parts' and loss terms' lr multipliers are
    kept. Groups of the new parts (head, regime) are also ramped linearly from 1/n to 1 over their first
    ``new_params_warmup_epochs`` (n steps), on top of the schedule."""
    if cfg.warmup_epochs < 0:
        raise CxrlabError(f"schedule.warmup_epochs must be >= 0, got {cfg.warmup_epochs}")
    if new_params_warmup_epochs < 0:
        raise CxrlabError(f"optim.new_params_warmup_epochs must be >= 0, got {new_params_warmup_epochs}")
    if choose(Schedule, cfg.name, "schedule.name") is Schedule.STEP and cfg.step_size <= 0:
        raise CxrlabError(f"schedule.step_size must be > 0, got {cfg.step_size}")
    ramp = int(round(new_params_warmup_epochs * steps_per_epoch))

    def schedule(step: int) -> float:
        return lr_factor(cfg, step, epochs, steps_per_epoch)

    def new_part(step: int) -> float:
        return schedule(step) * min(1.0, (step + 1) / ramp)

    lambdas = [new_part if ramp > 0 and g.get("part") in NEW_PARTS else schedule for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
