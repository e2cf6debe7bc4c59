"""Metrics by patient subgroup (sex, age band, view): a CheXclusion-style audit (Seyyed-Kalantari et al.,
"CheXclusion: Fairness gaps in deep chest X-ray classifiers", PSB 2021), which reports per-subgroup AUC and
the gap between the best and worst subgroup.

For each attribute the macro AUC of every subgroup averages one fixed label set: the labels with at least
``min_positives`` positives and one negative in *every* subgroup of that attribute (where no label has that
many, the labels with both classes in every subgroup), so the gap compares like with like. A subgroup with
no label of ``min_positives`` positives takes no part in choosing the set; its macro is left undefined
when it cannot score every label of it. Per-label AUCs
are given for labels with ``min_positives`` positives in the subgroup. CIs: percentile bootstrap over the
subgroup's images; a label lacking a class in a resample keeps its AUC from the whole subgroup, so every
resample averages the same labels as the point estimate.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..config import SUBGROUP_ATTRIBUTES as ATTRIBUTES
from ..errors import unknown
from .multilabel import binary_auc
UNKNOWN = ("unknown", "nan", "", "None")


def age_band_names(edges) -> list[str]:
    """[40, 60, 80] → ["<40", "40-59", "60-79", ">=80"]."""
    edges = [int(e) for e in edges]
    return ([f"<{edges[0]}"] + [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])] + [f">={edges[-1]}"]
            if edges else ["all"])


def subgroup_column(meta: pd.DataFrame, attribute: str, age_bands=(40, 60, 80)) -> pd.Series | None:
    """The subgroup of every row for ``attribute`` ("unknown" where the source does not say), or None
    when the meta has no such column (a source without demographics, or a cache made before they
    were recorded)."""
    if attribute not in ATTRIBUTES:
        raise unknown("eval.subgroups entry", attribute, ATTRIBUTES)
    if attribute == "age_band":
        if "age" not in meta.columns:
            return None
        age = pd.to_numeric(meta["age"], errors="coerce").to_numpy(dtype=np.float64)
        band = np.searchsorted(np.asarray(age_bands, dtype=np.float64), age, side="right")
        names = np.asarray(age_band_names(age_bands), dtype=object)
        return pd.Series(np.where(np.isnan(age), "unknown", names[np.minimum(band, len(names) - 1)]))
    if attribute not in meta.columns:
        return None
    values = meta[attribute].astype("str").fillna("unknown").str.strip().reset_index(drop=True)
    return values.where(~values.isin(UNKNOWN), "unknown")


def subgroup_report(probs, targets, mask, label_names, meta: pd.DataFrame, attributes=ATTRIBUTES,
                    age_bands=(40, 60, 80), min_positives: int = 10, bootstrap: int = 200, ci: float = 0.95,
                    seed: int = 0) -> dict:
    """{attribute: {"labels": the macro's label set, "groups": {name: {n_images, macro_auc, macro_auc_ci,
    per_label: {label: {auc, auc_ci, n_positive}}}}, "largest_gap": {between, macro_auc_gap}}} for every
    attribute the meta has; rows whose subgroup is unknown are left out (counted in ``n_unknown``)."""
    probs, targets = np.asarray(probs, np.float64), np.asarray(targets, np.float64)
    known = np.ones_like(targets, dtype=bool) if mask is None else np.asarray(mask) > 0
    names = [str(n) for n in label_names]
    out: dict = {}
    for attribute in attributes:
        column = subgroup_column(meta.reset_index(drop=True), attribute, age_bands)
        if column is None:
            column_name = "age" if attribute == "age_band" else attribute
            out[attribute] = {"unavailable": f"the data has no {column_name!r} column: the source does not give it, "
                                             "or its cache was prepared before cxrlab recorded it (prepare it anew)"}
            continue
        values = column.to_numpy(dtype=object)
        groups = [g for g in _ordered(values, attribute, age_bands) if g != "unknown"]
        rows = {g: np.flatnonzero(values == g) for g in groups}
        counts = {g: _class_counts(targets[r], known[r]) for g, r in rows.items()}
        # a subgroup without one label of min_positives positives (6 images under 40) cannot share a label
        # set with the others; it is listed unscored rather than emptying everyone's set
        floor = max(1, min_positives)
        scored = {g: c for g, c in counts.items() if (c[0] >= floor).any()} or counts
        labels, rule = _common_labels(scored, min_positives)
        block = {"labels": [names[j] for j in labels], "labels_rule": rule, "min_positives": int(min_positives),
                 "n_unknown": int(np.sum(values == "unknown")), "groups": {}}
        rng = np.random.RandomState(seed)
        for g in groups:
            r = rows[g]
            block["groups"][g] = _group(probs[r], targets[r], known[r], names, labels, counts[g], min_positives,
                                        bootstrap, ci, rng)
        scored = {g: v["macro_auc"] for g, v in block["groups"].items() if v["macro_auc"] is not None}
        if len(scored) >= 2:
            hi, lo = max(scored, key=scored.get), min(scored, key=scored.get)
            block["largest_gap"] = {"between": [hi, lo], "macro_auc_gap": scored[hi] - scored[lo]}
        out[attribute] = block
    return out


def _ordered(values: np.ndarray, attribute: str, age_bands) -> list[str]:
    present = set(values.tolist())
    if attribute == "age_band":
        return [b for b in [*age_band_names(age_bands), "unknown"] if b in present]
    return sorted(present)


def _class_counts(t: np.ndarray, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return ((t > 0.5) & known).sum(0), ((t <= 0.5) & known).sum(0)


def _common_labels(counts: dict, min_positives: int) -> tuple[np.ndarray, str]:
    """Labels every subgroup can score, and the rule that chose them: >= min_positives positives and a
    negative in each subgroup; where no label has that, both classes in each."""
    if not counts:
        return np.array([], dtype=np.int64), "no subgroup"
    pos = np.min([c[0] for c in counts.values()], axis=0)
    neg = np.min([c[1] for c in counts.values()], axis=0)
    enough = np.flatnonzero((pos >= max(1, min_positives)) & (neg >= 1))
    if len(enough):
        return enough, f">= {min_positives} positives and a negative in every subgroup"
    return (np.flatnonzero((pos >= 1) & (neg >= 1)),
            f"both classes in every subgroup (no label has {min_positives} positives in each)")


def _aucs(p: np.ndarray, t: np.ndarray, known: np.ndarray, columns) -> np.ndarray:
    return np.array([binary_auc(p[known[:, j], j], t[known[:, j], j]) for j in columns], dtype=np.float64)


def _group(p, t, known, names, labels, counts, min_positives, bootstrap, ci, rng) -> dict:
    n_pos, _ = counts
    reported = np.flatnonzero(n_pos >= max(1, min_positives))
    columns = np.union1d(labels, reported).astype(np.int64)
    point = _aucs(p, t, known, columns)
    draws = np.full((max(bootstrap, 0), len(columns)), np.nan)
    for b in range(max(bootstrap, 0)):
        r = rng.randint(0, len(p), len(p))
        draws[b] = _aucs(p[r], t[r], known[r], columns)
    draws = np.where(np.isnan(draws), point[None, :], draws)  # a class lost in a resample: keep the point AUC
    in_macro = np.isin(columns, labels)
    macro = float(point[in_macro].mean()) if in_macro.any() and np.isfinite(point[in_macro]).all() else None
    group = {"n_images": int(len(p)), "macro_auc": macro,
             "macro_auc_ci": _interval(draws[:, in_macro].mean(1), ci) if macro is not None and bootstrap else None,
             "per_label": {}}
    for k, j in enumerate(columns):
        if j in reported:
            group["per_label"][names[j]] = {"auc": _finite(point[k]), "n_positive": int(n_pos[j]),
                                            "auc_ci": _interval(draws[:, k], ci) if bootstrap else None}
    return group


def _interval(values: np.ndarray, ci: float):
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None
    tail = 100 * (1 - ci) / 2
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def _finite(x: float):
    return float(x) if np.isfinite(x) else None


def format_subgroups(block: dict) -> list[str]:
    """Markdown lines: one table per attribute (subgroup, images, macro AUC [CI]) and its largest gap."""
    lines: list[str] = []
    for attribute, b in block.items():
        if "unavailable" in b:
            lines += [f"- {attribute}: not reported ({b['unavailable']})"]
            continue
        lines += ["", f"### By {attribute.replace('_', ' ')}", "",
                  f"Macro AUC over the same {len(b['labels'])} labels in every subgroup: those with {b['labels_rule']}"
                  + (f"; {b['n_unknown']} images of unknown {attribute} left out" if b["n_unknown"] else "")
                  + f". Per-label AUCs (metrics.json) for labels with >= {b['min_positives']} positives in the subgroup.",
                  "", f"| subgroup | images | macro AUC [CI] | labels with >= {b['min_positives']} positives |",
                  "|---|---:|---|---:|"]
        for name, g in b["groups"].items():
            ci = g.get("macro_auc_ci")
            shown = "–" if g["macro_auc"] is None else f"{g['macro_auc']:.3f}" + (
                f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
            lines.append(f"| {name} | {g['n_images']} | {shown} | {len(g['per_label'])} |")
        if any(g["macro_auc"] is None for g in b["groups"].values()):
            lines += ["", "–: the subgroup lacks positives or negatives of some of these labels."]
        gap = b.get("largest_gap")
        if gap:
            lines += ["", f"Largest gap: {gap['between'][0]} − {gap['between'][1]} = {gap['macro_auc_gap']:+.3f}."]
    return lines
