"""``cxrlab list``: the names a recipe can use for each kind of part."""
from __future__ import annotations

from ..config import list_recipes
from ..errors import unknown
from ..registry import HEADS, LOSSES, REGIMES

LISTS = ("backbones", "heads", "losses", "regimes", "recipes", "text-encoders")


def list_names(what: str, pattern: str | None = None) -> list[str]:
    """The registered names of ``what`` (one of ``LISTS``); ``pattern`` filters backbones (a timm
    wildcard such as ``densenet*``)."""
    if what == "backbones":
        import timm  # lazy: start-up time (timm and torch load in seconds; only this list needs them)

        return timm.list_models(pattern or "*")
    if what == "text-encoders":
        from ..models.text import ENCODERS  # lazy: start-up time (torch; `list recipes` needs none)

        return list(ENCODERS)
    lists = {"heads": HEADS.names, "losses": LOSSES.names, "regimes": REGIMES.names, "recipes": list_recipes}
    if what not in lists:
        raise unknown("list", what, LISTS)
    return lists[what]()
