"""Tuned comparisons: every recipe searches the same grid of overrides and keeps, per fold (or seed), the
candidate with the best validation score.

``cxrlab compare A B --tune optim.lr=1e-3,3e-4 --tune train.epochs=5,10`` makes the cartesian product of
the values (4 candidates, in the order given); for each recipe and fold every candidate is trained as an
override on top of the recipe into ``<fold>/tune/c<i>/``. The choice reads one number per candidate: the
best validation score the trainer selected its checkpoint on (``train.select_on``, recorded in
``best/checkpoint.json``). Test metrics and test predictions play no part in it, so a comparison cannot
favour a recipe by tuning it on its test images, and each recipe gets the same search budget.
"""
from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import read_info
from ..config import Recipe, load_recipe
from ..errors import CxrlabError

# keys a search may not vary: every recipe and candidate must see the same data and split, and the
# candidates' validation scores must be of one kind to be compared
_FIXED = ("data.", "train.select_on")


@dataclass(frozen=True)
class Candidate:
    """One point of the grid: its folder name under ``tune/`` and its values (as typed) by key."""

    id: str
    values: dict

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.values.items()]


def parse_grid(specs: list[str]) -> list[Candidate]:
    """``["optim.lr=1e-3,3e-4", "train.epochs=5,10"]`` -> the cartesian product of the values, first key
    slowest. Commas inside brackets belong to a value (``model.freeze=[stem,stages.0],[]``)."""
    axes: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CxrlabError(f"--tune {spec!r}: expected KEY=V1,V2,... (e.g. optim.lr=1e-3,3e-4)")
        if key.startswith(_FIXED):
            raise CxrlabError(f"--tune {key}: data.* and train.select_on are the same for every recipe and "
                              "candidate; tune model, loss, optim, schedule or train keys")
        if key in axes:
            raise CxrlabError(f"--tune {key} is given twice; list all its values in one flag ({key}=V1,V2,...)")
        values = _split_values(text)
        if not any(values):
            raise CxrlabError(f"--tune {key}: no values (e.g. {key}=V1,V2)")
        if not all(values):
            raise CxrlabError(f"--tune {key}={text}: an empty value between commas")
        twice = [v for v, n in Counter(values).items() if n > 1]
        if twice:
            raise CxrlabError(f"--tune {key}: value {twice[0]!r} is listed twice")
        axes[key] = values
    return [Candidate(f"c{i}", dict(zip(axes, point)))
            for i, point in enumerate(itertools.product(*axes.values()))]


def _split_values(text: str) -> list[str]:
    values, depth, current = [], 0, ""
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    return values + [current.strip()]


@dataclass
class Search:
    """One recipe's search: the shared grid and the recipe under each candidate's overrides."""

    grid: list[Candidate]
    recipes: list[Recipe]

    def set_seed(self, seed: int) -> None:
        for recipe in self.recipes:
            recipe.train.seed = seed


def make_search(recipe_source: str, overrides: list[str], grid: list[Candidate]) -> Search:
    """Load the recipe once per candidate, so a bad key or value fails before any training."""
    clash = sorted({c.split("=", 1)[0].strip() for c in overrides} & set(grid[0].values))
    if clash:
        raise CxrlabError(f"{clash[0]} is both set (--set/--data) and tuned (--tune); keep one")
    recipes = []
    for candidate in grid:
        try:
            recipes.append(load_recipe(recipe_source, list(overrides) + candidate.overrides))
        except CxrlabError as exc:
            raise CxrlabError(f"--tune {', '.join(candidate.overrides)} on {recipe_source}: {exc}") from None
    return Search(grid, recipes)


def select(scores: list[float | None], higher_is_better: bool = True) -> int:
    """Index of the best validation score; a tie goes to the earlier candidate, and an undefined score
    (None or NaN) never beats a defined one (all undefined: the first candidate)."""
    defined = [i for i, score in enumerate(scores) if score is not None and math.isfinite(score)]
    sign = 1 if higher_is_better else -1
    return max(defined, key=lambda i: (sign * scores[i], -i)) if defined else 0


def validation_score(run_dir: Path) -> tuple[float | None, str]:
    """(best validation score or None, its metric) of a finished run, as its trainer recorded them in
    ``best/checkpoint.json``; only the validation part enters this number."""
    info = read_info(Path(run_dir) / "best")
    score = info.get("trainer", {}).get("score")
    score = float(score) if score is not None and math.isfinite(score) else None
    return score, info["recipe"]["train"]["select_on"]


def tune_run(search: Search, run_dir: Path, run_once, **kwargs) -> tuple[dict, Path, dict]:
    """Train (or read back) every candidate of ``search`` under ``run_dir/tune``; choose on validation.

    ``run_once(recipe, folder, **kwargs)`` trains one run (or reads a finished one back) and returns its
    test metrics; the choice is made without them, and only the chosen run's are kept. Returns the chosen candidate's test metrics, its folder
    and a record of the choice (also written to ``run_dir/tune.json``).
    """
    run_dir = Path(run_dir)
    folders = [run_dir / "tune" / c.id for c in search.grid]
    for recipe, folder in zip(search.recipes, folders):
        run_once(recipe, folder, **kwargs)
    scored = [validation_score(folder) for folder in folders]
    select_on = scored[0][1]
    chosen = select([score for score, _ in scored], higher_is_better=select_on != "loss")
    metrics = run_once(search.recipes[chosen], folders[chosen], **kwargs)  # a finished run: read back
    record = {"run": run_dir.name, "chosen": search.grid[chosen].id, "values": search.grid[chosen].values,
              "select_on": f"val_{select_on}",
              "val_scores": {c.id: score for c, (score, _) in zip(search.grid, scored)}}
    (run_dir / "tune.json").write_text(json.dumps(record, indent=2))
    return metrics, folders[chosen], record


def summarize(grid: list[Candidate], records: list[dict]) -> dict:
    """A recipe's search for the report: the grid, each fold's choice and scores, how often each won."""
    counts = Counter(r["chosen"] for r in records)
    return {"candidates": {c.id: c.values for c in grid},
            "select_on": records[0]["select_on"] if records else None,
            "runs": records,
            "times_chosen": {c.id: counts.get(c.id, 0) for c in grid}}
