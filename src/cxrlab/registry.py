"""Name -> factory registries for heads, losses and regimes, so recipes can refer to parts by name.

Backbones are not registered here: timm already is the registry for them (see models/backbone.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import unknown


class Registry:
    """``extras``: for heads and regimes, the Output extras keys a registered class declares it fills
    (with default arguments); losses fill none."""

    def __init__(self, kind: str, extras: Callable[[Any], frozenset] = lambda factory: frozenset()):
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}
        self._extras = extras

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

    def items(self) -> list[tuple[str, Callable[..., Any]]]:
        """``(name, factory)`` pairs in registration order (a module's main part before its variants)."""
        _load_builtin_components()
        return list(self._items.items())

    def name_of(self, factory: Callable[..., Any]) -> str | None:
        """The name ``factory`` is registered under (None if it is not)."""
        return next((n for n, f in self.items() if f is factory), None)

    def providers(self, keys) -> list[str]:
        """The registered parts that declare every extras key of ``keys``, in registration order."""
        return [n for n, f in self.items() if set(keys) <= self._extras(f)]

    def __contains__(self, name: str) -> bool:
        _load_builtin_components()
        return name in self._items


HEADS = Registry("head", extras=lambda head_cls: head_cls.extras_for({}))
LOSSES = Registry("loss")
REGIMES = Registry("regime", extras=lambda regime_cls: regime_cls.extras_for({}))

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
