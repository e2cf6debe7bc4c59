"""Freezing parts of a model and initialising parts of it from another model's weights.

These make two-stage recipes (GL-MLL style: train the backbone with BCE first, then a label-level head on a
partly frozen backbone) and linear probes (a frozen backbone, a new linear head) recipes instead of code:
``model.freeze`` and ``model.init_from`` (see :mod:`cxrlab.config`).

Part names are prefixes of the model's parameter names cut at dots (``backbone`` covers every
``backbone.*`` parameter; ``backbone.net.layer1`` covers that stage), so any timm backbone's own module
names work without a table of aliases.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import CxrlabError, closest


def freeze_names(names, key: str = "model.freeze") -> list[str]:
    """``model.freeze`` as a list of part names (checked in form only; names are checked on the model)."""
    if names is None:
        return []
    if isinstance(names, str):
        return [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise CxrlabError(f"{key} must be a part name or a list of part names, got {names!r}")
    return list(names)


def _covers(prefix: str, name: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def module_names(model: nn.Module) -> list[str]:
    """Every name a part can be given: each module and parameter path of the model."""
    return [n for n, _ in model.named_modules() if n] + [n for n, _ in model.named_parameters()]


def _check_names(model: nn.Module, names: list[str], key: str) -> None:
    valid = module_names(model)
    for name in names:
        if not any(_covers(name, v) for v in valid):
            hint = closest(name, valid)
            top = sorted({v.split(".")[0] for v in valid})
            raise CxrlabError(f"{key}: the model has no part {name!r}"
                              + (f"; did you mean {hint!r}?" if hint else "")
                              + f" (parts start with: {', '.join(top)})")


def _keep_eval(module: nn.Module, args) -> None:
    # a frozen normalisation layer keeps its running statistics even while the rest of the model trains
    module.training = False


def freeze(model: nn.Module, names) -> list[str]:
    """Stop training the parts ``names`` (``"backbone"`` or a list of prefixes): their parameters lose
    ``requires_grad`` (so the optimiser never sees them) and their normalisation layers stay in eval
    mode, keeping their statistics, whatever ``model.train()`` says. Returns the frozen parameter names."""
    names = freeze_names(names)
    if not names:
        return []
    _check_names(model, names, "model.freeze")
    frozen = []
    for pname, p in model.named_parameters():
        if any(_covers(n, pname) for n in names):
            p.requires_grad_(False)
            frozen.append(pname)
    for mname, module in model.named_modules():
        if mname and any(_covers(n, mname) for n in names) and isinstance(module, nn.modules.batchnorm._NormBase):
            module.eval()
            module.register_forward_pre_hook(_keep_eval)
    return frozen


def load_parts(model: nn.Module, tensors: dict[str, torch.Tensor], parts: Iterable[str] | None,
               where: str) -> list[str]:
    """Copy weights from ``tensors`` (a state dict by name) into ``model``: all of them (``parts`` None) or
    only those under the given prefixes. Strict within what is loaded: a key the model expects but the
    file lacks, a key the file has but the model lacks, or a shape that differs is an error naming the
    key and ``where``. Returns the loaded names."""
    parts = None if parts is None else freeze_names(list(parts), "model.init_from parts")
    if parts is not None:
        _check_names(model, parts, "model.init_from parts")
    own = model.state_dict()

    def selected(name: str) -> bool:
        return parts is None or any(_covers(p, name) for p in parts)

    wanted = [k for k in own if selected(k)]
    offered = {k: v for k, v in tensors.items() if selected(k)}
    missing = [k for k in wanted if k not in offered]
    unexpected = [k for k in offered if k not in own]
    if missing or unexpected:
        detail = key_mismatch(missing, unexpected, "e.g.")
        scope = "all weights" if parts is None else f"parts {', '.join(parts)}"
        raise CxrlabError(f"model.init_from {where}: its weights do not fit this model ({scope}): "
                          f"{detail}; load fewer parts with init_from: {{path: ..., parts: [backbone]}}")
    for k in wanted:
        if tuple(offered[k].shape) != tuple(own[k].shape):
            raise CxrlabError(f"model.init_from {where}: {k} has shape {tuple(offered[k].shape)} in the file but "
                              f"{tuple(own[k].shape)} in this model")
    with torch.no_grad():
        for k in wanted:
            own[k].copy_(offered[k].to(own[k].dtype))
    return wanted


def init_from_spec(value) -> tuple[str, list[str] | None] | None:
    """``model.init_from`` as (path, parts or None); None when unset."""
    if value is None:
        return None
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict):
        extra = set(value) - {"path", "parts"}
        if extra:
            raise CxrlabError(f"model.init_from: unknown key {sorted(extra)[0]!r} (valid: path, parts)")
        if not isinstance(value.get("path"), str):
            raise CxrlabError(f"model.init_from needs a 'path' (a checkpoint folder), got {value!r}")
        return value["path"], freeze_names(value.get("parts"), "model.init_from parts") or None
    raise CxrlabError(f"model.init_from must be a checkpoint folder or {{path, parts}}, got {value!r}")


def key_mismatch(missing: list[str], unexpected: list[str], lead: str = "first:") -> str:
    """``"12 missing (first: a, b, c); 1 unexpected (first: x)"``: how a state dict and a model disagree,
    in one line."""
    detail = []
    if missing:
        detail.append(f"{len(missing)} missing ({lead} {', '.join(missing[:3])})")
    if unexpected:
        detail.append(f"{len(unexpected)} unexpected ({lead} {', '.join(unexpected[:3])})")
    return "; ".join(detail)
