"""Name -> factory registries for heads, losses and regimes, so recipes can refer to parts by name.

Backbones are not registered here: timm already is the registry for them (see models/backbone.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import unknown


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def add(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} registered twice")
            self._items[name] = factory
            return factory

        return add

    def get(self, name: str) -> Callable[..., Any]:
        _load_builtin_components()
        if name not in self._items:
            raise unknown(self.kind, name, self._items)
        return self._items[name]

    def names(self) -> list[str]:
        _load_builtin_components()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        _load_builtin_components()
        return name in self._items


HEADS = Registry("head")
LOSSES = Registry("loss")
REGIMES = Registry("regime")

_loaded = False


def _load_builtin_components() -> None:
    """Import the modules that register the built-in parts (once, lazily, to keep imports cheap)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    import pkgutil

    for package in ("cxrlab.models.heads", "cxrlab.losses", "cxrlab.regimes"):
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{package}.{info.name}")
