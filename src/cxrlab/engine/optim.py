"""Optimiser and per-step learning-rate schedule from a recipe's ``optim`` and ``schedule`` sections.

Parameter groups:
  * network weights (model + regime modules) at ``lr`` with weight decay;
  * biases and normalisation parameters (every parameter with ≤ 1 dimension) at ``lr`` without decay,
    since decaying them only fights the normalisation (as timm and most reference code do);
  * each loss term's own trainable parameters (e.g. ROLE's label matrix) at ``lr * term.lr_multiplier``
    (default 1) and ``term.weight_decay`` (default 0: a label estimate is not a network weight).
The schedule is a ``LambdaLR`` stepped once per optimiser step, so warm-up can end mid-epoch.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..config import OptimConfig, ScheduleConfig
from ..errors import CxrlabError


def param_groups(modules: Iterable[nn.Module], objective: nn.Module | None, lr: float,
                 weight_decay: float) -> list[dict]:
    """Optimiser parameter groups (named by their ``name`` key); empty groups are left out."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for module in modules:
        for _, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0}]
    terms = getattr(objective, "terms", {}) if objective is not None else {}
    for term_name, term in terms.items():
        params = [p for p in term.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        groups.append({"name": f"loss.{term_name}", "params": params,
                       "lr": lr * float(getattr(term, "lr_multiplier", 1.0)),
                       "weight_decay": float(getattr(term, "weight_decay", 0.0))})
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: OptimConfig, modules: Iterable[nn.Module], objective: nn.Module | None = None,
                    fused: bool = False) -> torch.optim.Optimizer:
    """AdamW, Adam (L2 weight decay, as several CXR papers train) or SGD (momentum, optional Nesterov)
    over :func:`param_groups`.

    ``fused`` picks PyTorch's fused CUDA kernels (AdamW), worth having when every parameter is on a GPU.
    """
    groups = param_groups(modules, objective, cfg.lr, cfg.weight_decay)
    if not groups:
        raise CxrlabError("nothing to train: the model, regime and loss have no trainable parameters")
    name = cfg.name.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    if name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    if name == "sgd":
        if cfg.nesterov and cfg.momentum <= 0:
            raise CxrlabError("optim.nesterov needs optim.momentum > 0")
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    raise CxrlabError(f"unknown optim.name {cfg.name!r} (valid: adamw, adam, sgd)")


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
    name = cfg.name.lower()
    if name == "constant":
        return 1.0
    if name == "cosine":
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "step":
        if cfg.step_size <= 0:
            raise CxrlabError(f"schedule.step_size must be > 0, got {cfg.step_size}")
        return cfg.gamma ** ((step // max(1, steps_per_epoch)) // cfg.step_size)
    raise CxrlabError(f"unknown schedule.name {cfg.name!r} (valid: cosine, step, constant)")


def build_scheduler(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, epochs: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR``; it scales every group, so the loss terms' lr multipliers are kept."""
    if cfg.warmup_epochs < 0:
        raise CxrlabError(f"schedule.warmup_epochs must be >= 0, got {cfg.warmup_epochs}")
    if cfg.name.lower() not in ("cosine", "step", "constant"):
        raise CxrlabError(f"unknown schedule.name {cfg.name!r} (valid: cosine, step, constant)")
    if cfg.name.lower() == "step" and cfg.step_size <= 0:
        raise CxrlabError(f"schedule.step_size must be > 0, got {cfg.step_size}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, epochs, steps_per_epoch))
