"""Loss terms. Every registered term is importable by its class name, and the building blocks too:

    from cxrlab.losses import BCE, WeightedBCE, Focal, ASL, LossContext, Objective

A term that needs no training-set statistics is called as ``loss(logits, target, mask=None)``
(``BCE()``, ``Focal(gamma=2)``, ``ASL()``); one that needs them takes a ``LossContext``
(``LossContext.from_targets(names, target, mask)``) or, for weighted BCE, ``pos_weight=``. A recipe
names the same classes by their registry names (``bce``, ``weighted_bce``, ``focal``, ``asl``, ...:
``cxrlab list losses``).

The class names resolve on first use: importing every loss module here would import them all (and what
they import) whenever any one module of this package is imported.
"""
from __future__ import annotations

from ..registry import LOSSES
from .base import LabelLoss, LossContext, LossTerm, Objective, masked_mean  # noqa: F401 (the public names)


def __getattr__(name: str):
    if name.startswith("__"):  # a tool probing for __wrapped__ and the like need not load every loss
        raise AttributeError(name)
    for _, factory in LOSSES.items():  # imports the loss modules, once
        if getattr(factory, "__name__", None) == name:
            return factory
    if name in globals():  # a submodule, imported just now by the registry's loader
        return globals()[name]
    raise AttributeError(f"module 'cxrlab.losses' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *(f.__name__ for _, f in LOSSES.items())})
