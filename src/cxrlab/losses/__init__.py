"""Loss terms. Every registered term is importable by its class name, and the building blocks too:

    from cxrlab.losses import BCE, WeightedBCE, Focal, ASL, LossContext, Objective

A term that needs no training-set statistics is called as ``loss(logits, target, mask=None)``
(``BCE()``, ``Focal(gamma=2)``, ``ASL()``); one that needs them takes a ``LossContext``
(``LossContext.from_targets(names, target, mask)``) or, for weighted BCE, ``pos_weight=``. A recipe
names the same classes by their registry names (``bce``, ``weighted_bce``, ``focal``, ``asl``, ...:
``cxrlab list losses``).

The names resolve on first use: importing the registry's modules here would import every loss (and
what it imports) whenever any one module of this package is imported.
"""
from __future__ import annotations

import importlib

_BASE = ("LossContext", "LossTerm", "LabelLoss", "Objective", "masked_mean")


def __getattr__(name: str):
    if name in _BASE:
        return getattr(importlib.import_module("cxrlab.losses.base"), name)
    if name.startswith("__"):  # a tool probing for __wrapped__ and the like need not load every loss
        raise AttributeError(name)
    from ..registry import LOSSES

    for _, factory in LOSSES.items():
        if getattr(factory, "__name__", None) == name:
            return factory
    if name in globals():  # a submodule, imported just now by the registry's loader
        return globals()[name]
    raise AttributeError(f"module 'cxrlab.losses' has no attribute {name!r}")


def __dir__() -> list[str]:
    from ..registry import LOSSES

    return sorted({*globals(), *_BASE, *(f.__name__ for _, f in LOSSES.items())})
