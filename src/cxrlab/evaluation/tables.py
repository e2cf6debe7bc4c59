"""Aggregation of fold/seed reports (mean ± std) and the side-by-side recipe comparison tables."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import CxrlabError
from ..metrics.multilabel import HEADLINE_METRICS
from ..serialization import write_json
from .protocol import merge_protocols, protocol_line



def _value(x) -> float:
    return float("nan") if x is None or isinstance(x, bool) else float(x)


def _is_metric(x) -> bool:
    return x is None or (isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool))


def _stats(values: list) -> dict:
    """mean, sample std (ddof=1) and n over the finite values (NaN where undefined)."""
    a = np.array([_value(v) for v in values])
    a = a[np.isfinite(a)]
    mean = float(a.mean()) if a.size else float("nan")
    std = float(a.std(ddof=1)) if a.size > 1 else float("nan")
    return {"mean": mean, "std": std, "n": int(a.size)}


def aggregate(reports: list[dict]) -> dict:
    """Mean ± std (ddof=1, NaN-aware) of every numeric top-level and per-label metric over fold/seed reports.

    Returns ``{metric: {"mean", "std", "n"}, "per_label": {name: {metric: {...}, "n_defined": k}},
    "n_reports": R}``; ``n`` counts the reports where the value was defined, so a label undefined in some
    folds is averaged over the others and says so. Non-numeric entries (lists, dicts, strings) are skipped.
    """
    if not reports:
        raise CxrlabError("aggregate needs at least one report")
    out: dict = {}
    protocols = merge_protocols([r.get("protocol") for r in reports])
    # a study block's headline numbers aggregate as ``study/<metric>`` beside the image level's
    reports = [{**r, **{f"study/{k}": v for k, v in (r.get("study") or {}).items() if k != "per_label"}}
               for r in reports]
    keys = [k for k in dict.fromkeys(k for r in reports for k in r) if k != "per_label"]
    for key in keys:
        values = [r.get(key) for r in reports]
        if all(_is_metric(v) for v in values) and (key in HEADLINE_METRICS or any(v is not None for v in values)):
            out[key] = _stats(values)
    per_label: dict = {}
    names = list(dict.fromkeys(n for r in reports for n in r.get("per_label", {})))
    for name in names:
        rows = [r.get("per_label", {}).get(name, {}) for r in reports]
        metrics = [k for k in dict.fromkeys(k for row in rows for k in row)
                   if all(_is_metric(row.get(k)) for row in rows)]
        per_label[name] = {k: _stats([row.get(k) for row in rows]) for k in metrics}
        per_label[name]["n_defined"] = sum(_value(row.get("auc")) == _value(row.get("auc")) for row in rows)
    out["per_label"] = per_label
    out["n_reports"] = len(reports)
    if protocols:
        out["protocol"] = protocols
    return out


def _cell(stats: dict | None, best: bool = False) -> str:
    if not stats or not math.isfinite(_value(stats.get("mean"))):
        return "–"
    text = f"{stats['mean']:.4f}"
    text += f" ± {stats['std']:.4f}" if math.isfinite(_value(stats.get("std"))) else f" (n={stats['n']})"
    return f"**{text}**" if best else text


# shown in comparison.md when some recipe reports them: MPC's pseudo-label recovery of hidden positives,
# and how a label-level head's G correlates with the training co-occurrence
OPTIONAL_COLUMNS = ("study/macro_auc", "study/map", "study/macro_f1", "study/macro_f1_at_0.5",
                    "pseudo_pos_precision", "pseudo_pos_recall", "g_vs_cooccurrence_r")


def write_comparison(results: dict, out_dir,
                     metrics: Sequence[str] = ("macro_auc", "map", "macro_f1", "macro_f1_at_0.5"),
                     tuning: dict | None = None):
    """Write ``comparison.json`` (recipe → metric → {mean, std, n}) and a side-by-side ``comparison.md``.

    ``results`` maps recipe name → ``aggregate(...)`` output. The JSON holds every aggregated top-level
    metric plus per-label AUC under ``auc/<label>``; the Markdown shows ``metrics`` (best mean in bold)
    and a per-label AUC table. ``tuning`` (recipe → ``workflows.tuning.summarize(...)``, the same grid
    for every recipe) adds each recipe's search under its ``tuning`` key and a Markdown section.
    Returns (md_path, json_path).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = {}
    for recipe, agg in results.items():
        row = {k: v for k, v in agg.items() if isinstance(v, dict) and "mean" in v}
        for label, m in agg.get("per_label", {}).items():
            if "auc" in m:
                row[f"auc/{label}"] = m["auc"]
        table[recipe] = {k: {"mean": v["mean"], "std": v["std"], "n": v["n"]} for k, v in row.items()}
    json_path = out_dir / "comparison.json"
    write_json(json_path, {r: {**row, "tuning": tuning[r]} if tuning else row for r, row in table.items()})
    md_path = out_dir / "comparison.md"
    extra = [m for m in OPTIONAL_COLUMNS if any(m in row for row in table.values())]
    text = _comparison_markdown(results, table, list(metrics) + extra)
    md_path.write_text(text + (_tuning_markdown(tuning) if tuning else ""))
    return md_path, json_path


def _tuning_markdown(tuning: dict) -> str:
    """The shared grid, then per recipe each run's validation score of every candidate (the chosen one in
    bold) and how often each candidate was chosen."""
    grids = [search["candidates"] for search in tuning.values()]
    if any(grid != grids[0] for grid in grids):
        raise CxrlabError("the recipes of a comparison searched different candidates; the report assumes one grid")
    grid = grids[0]
    keys = list(next(iter(grid.values())))
    lines = ["", "## Tuning", "",
             f"Every recipe searched the same {len(grid)} candidates in every fold or seed; selection on the "
             "validation part only (each candidate's best validation score, the one its trainer selected its "
             "checkpoint on); test metrics and predictions are not read for it. The tables above and the paired "
             "tests use the chosen run of each fold or seed.", "",
             "| candidate | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {cid} | " + " | ".join(str(values[k]) for k in keys) + " |" for cid, values in grid.items()]
    for recipe, search in tuning.items():
        runs = search["runs"]
        lines += ["", f"### {recipe}: {search['select_on']} per candidate", "",
                  "| run | " + " | ".join(grid) + " | chosen |", "|---|" + "---:|" * len(grid) + "---|"]
        for run in runs:
            cells = [_score_cell(run["val_scores"].get(cid), cid == run["chosen"]) for cid in grid]
            chosen = ", ".join(f"{k}={v}" for k, v in run["values"].items())
            lines.append(f"| {run['run']} | " + " | ".join(cells) + f" | {run['chosen']} ({chosen}) |")
        counts = ", ".join(f"{cid} {n}/{len(runs)}" for cid, n in search["times_chosen"].items())
        lines += ["", f"Times chosen: {counts}."]
    return "\n".join(lines) + "\n"


def _score_cell(score, chosen: bool) -> str:
    text = "–" if score is None or not math.isfinite(_value(score)) else f"{score:.4f}"
    return f"**{text}**" if chosen else text


def _best(table: dict, key: str) -> str | None:
    means = {r: _value(row.get(key, {}).get("mean")) for r, row in table.items()}
    means = {r: v for r, v in means.items() if math.isfinite(v)}
    return max(means, key=means.get) if len(means) > 1 else None


def _protocol_lines(results: dict) -> list[str]:
    """One protocol line when every recipe shares it, else one per recipe (the differences show)."""
    protocols = {r: protocol_line(agg.get("protocol")) for r, agg in results.items() if agg.get("protocol")}
    if not protocols:
        return []
    if len(set(protocols.values())) == 1:
        return [next(iter(protocols.values())) + " (every recipe; counts per run)", ""]
    return [f"- {r}: {line}" for r, line in protocols.items()] + [""]


def _comparison_markdown(results: dict, table: dict, metrics: list[str]) -> str:
    runs = {r: agg.get("n_reports", "?") for r, agg in results.items()}
    lines = ["# Recipe comparison", "", *_protocol_lines(results), "mean ± sample std over folds/seeds; best mean in bold; "
             "`study/` columns score one prediction per study.", "",
             "| recipe | runs | " + " | ".join(metrics) + " |", "|---|---:|" + "---:|" * len(metrics)]
    best = {m: _best(table, m) for m in metrics}
    for recipe, row in table.items():
        cells = [_cell(row.get(m), best[m] == recipe) for m in metrics]
        lines.append(f"| {recipe} | {runs[recipe]} | " + " | ".join(cells) + " |")
    labels = list(dict.fromkeys(k[4:] for row in table.values() for k in row if k.startswith("auc/")))
    if labels:
        recipes = list(table)
        lines += ["", "## Per-label AUC", "", "| label | " + " | ".join(recipes) + " |",
                  "|---|" + "---:|" * len(recipes)]
        for label in labels:
            key = f"auc/{label}"
            b = _best(table, key)
            lines.append(f"| {label} | " + " | ".join(_cell(table[r].get(key), b == r) for r in recipes) + " |")
    return "\n".join(lines) + "\n"
