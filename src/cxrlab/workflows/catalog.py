"""``cxrlab list``: the names a recipe can use for each kind of part, and the recipes as a table (method,
data, paper, what each is for) that ``--data`` and ``--method`` filter."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from importlib import metadata

from .. import __version__
from ..config import find_recipe, list_recipes, load_recipe
from ..errors import CxrlabError, unknown
from ..progress import plural
from ..registry import HEADS, LOSSES, REGIMES

LISTS = ("backbones", "heads", "losses", "regimes", "recipes", "text-encoders")
# what `data.source`'s KIND is called in the table (and in --data, case aside)
DATA_KINDS = {"synthetic": "synthetic", "nih": "NIH", "chexpert": "CheXpert", "mimic": "MIMIC", "csv": "CSV",
              "folder": "folder"}
METHODS = ("LCL", "MPC", "CAN", "DWML", "MSML", "SPML", "baseline")
SPML_LOSSES = {"an", "an_ls", "wan", "epr", "role", "ll_r", "ll_ct", "ll_cp"}


def list_names(what: str, pattern: str | None = None) -> list[str]:
    """The registered names of ``what`` (one of ``LISTS``); ``pattern`` (a shell wildcard such as
    ``densenet*``) keeps the names it matches."""
    if what == "backbones":
        import timm  # lazy: start-up time (timm and torch load in seconds; only this list needs them)

        return timm.list_models(pattern or "*")
    if what == "text-encoders":
        from ..models.text import ENCODERS  # lazy: start-up time (torch; `list recipes` needs none)

        names = list(ENCODERS)
    else:
        lists = {"heads": HEADS.names, "losses": LOSSES.names, "regimes": REGIMES.names, "recipes": list_recipes}
        if what not in lists:
            raise unknown("list", what, LISTS)
        names = lists[what]()
    return [n for n in names if pattern is None or fnmatch.fnmatchcase(n, pattern)]


@dataclass
class RecipeRow:
    name: str
    method: str       # the family its parts belong to (METHODS), "baseline" for plain heads and losses
    data: str         # DATA_KINDS of data.source
    paper: str        # its cite: line, shortened
    description: str  # the first sentence of the comment the recipe file starts with


def recipe_rows(data: str | None = None, method: str | None = None, pattern: str | None = None) -> list[RecipeRow]:
    """One row per recipe (``list_recipes``), kept when its data kind is ``data`` (``nih``, ``synthetic``,
    ...), its method is ``method`` or its name starts with ``method_`` (``lcl`` keeps LCL's baselines too),
    and its name matches the wildcard ``pattern``; any of them None keeps all."""
    if data is not None and data.lower() not in DATA_KINDS:
        raise unknown("--data kind", data.lower(), DATA_KINDS)
    if method is not None and method.lower() not in {m.lower() for m in METHODS}:
        raise unknown("--method", method.lower(), [m.lower() for m in METHODS])
    rows = []
    for name in list_names("recipes", pattern):
        row = _recipe_row(name)
        if data is not None and row.data.lower() != data.lower():
            continue
        if method is not None and row.method.lower() != method.lower() \
                and not name.lower().startswith(method.lower() + "_"):
            continue
        rows.append(row)
    return rows


def recipe_table(rows: list[RecipeRow], width: int = 60) -> str:
    """The rows as aligned text columns; paper and description cut to ``width`` characters."""
    head = RecipeRow("recipe", "method", "data", "paper", "description")
    cells = [[r.name, r.method, r.data, _cut(r.paper, 38), _cut(r.description, width)] for r in [head, *rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = ["  ".join([*(c[i].ljust(widths[i]) for i in range(4)), c[4]]).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in [*widths, min(width, max(len(c[4]) for c in cells))]))
    return "\n".join(lines)


def _recipe_row(name: str) -> RecipeRow:
    path = find_recipe(name, quiet=True)
    description = _leading_sentence(path.read_text(errors="replace"))
    try:
        recipe = load_recipe(name)
    except CxrlabError as exc:  # one broken recipe of the user's does not hide the others
        return RecipeRow(name, "?", "?", "?", f"cannot be loaded: {exc}")
    kind = recipe.data.source.partition(":")[0].lower()
    return RecipeRow(name, _method(recipe), DATA_KINDS.get(kind, kind), recipe.cite.split(";")[0].strip() or "–",
                     description)


def _method(recipe) -> str:
    """The method family a recipe's head, losses, regime and label policy belong to."""
    head, losses = recipe.model.head, set(recipe.loss)
    if recipe.regime.name == "mpc":
        return "MPC"
    if head == "lcl" or any(name.startswith("lcl_") for name in losses):
        return "LCL"
    if head in ("cross_attention", "concat") or losses & {"ml_balance", "can_attention"}:
        return "CAN"
    if head == "prototype" or "dwml" in losses:
        return "DWML"
    if head == "bilinear" or losses & {"msml", "corloss"}:
        return "MSML"
    if recipe.data.policy == "spml" or losses & SPML_LOSSES:
        return "SPML"
    return "baseline"


def _leading_sentence(text: str) -> str:
    """The first sentence of the comment lines a YAML file starts with ('' without one)."""
    comment = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    words = " ".join(comment).split()
    depth = 0  # a full stop inside parentheses ("Comput. Biol. Med.") ends no sentence
    for i, word in enumerate(words):
        depth = max(0, depth + word.count("(") - word.count(")"))
        if depth == 0 and word.endswith(".") and (i + 1 == len(words) or words[i + 1][:1].isupper()):
            return " ".join(words[:i + 1])
    return " ".join(words)


def _cut(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    return text[:width - 1].rsplit(" ", 1)[0].rstrip(",;:(") + "…"


def version_text() -> str:
    """``cxrlab --version``: this package's version, the torch (with its build: ``+cpu``, ``+cu121``) and
    timm it runs with, and whether CUDA is usable; torch is imported only when installed (the ONNX serving
    install may lack it)."""
    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    try:
        import torch  # lazy: start-up time; only this command needs it, and a serving install may lack it
    except ImportError:
        torch = None
    lines = [f"cxrlab {__version__}", f"torch {torch.__version__ if torch else installed('torch')}",
             f"timm {installed('timm')}"]
    if torch is None:
        lines.append("CUDA: unknown (torch not installed)")
    elif torch.cuda.is_available():
        lines.append(f"CUDA {torch.version.cuda}: {plural(torch.cuda.device_count(), 'device')}, "
                     f"{torch.cuda.get_device_name(0)}")
    else:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
        lines.append(f"CUDA: not available (this torch is built for {build})")
    return "\n".join(lines)
