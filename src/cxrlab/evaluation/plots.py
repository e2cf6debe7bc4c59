"""Report figures, drawn on matplotlib's Agg canvas (no display, no global pyplot state, safe in workers)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..labels import label_cooccurrence
from ..metrics.multilabel import check_inputs, roc_points

MAX_CURVE_POINTS = 2000  # a 100k-image ROC curve drawn at 2000 points looks the same and saves fast


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), constrained_layout=True)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _grid(n: int) -> tuple[int, int]:
    cols = max(1, math.ceil(math.sqrt(n)))
    return math.ceil(n / cols), cols


def _thin(*arrays):
    """Every k-th point (and the last) so long curves stay light."""
    n = arrays[0].size
    if n <= MAX_CURVE_POINTS:
        return arrays
    keep = np.unique(np.r_[np.linspace(0, n - 1, MAX_CURVE_POINTS).astype(int), n - 1])
    return tuple(a[keep] for a in arrays)


def plot_roc_curves(path, probs, targets, mask, label_names, per_label: dict | None = None) -> Path:
    """ROC curve per label as small multiples, titled with the AUC; undefined labels say so."""
    p, t, known = check_inputs(probs, targets, mask, label_names)
    rows, cols = _grid(len(label_names))
    fig = _figure(2.4 * cols, 2.3 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for j, name in enumerate(label_names):
        ax = axes[j]
        y = t[known[:, j], j] > 0.5
        auc = (per_label or {}).get(name, {}).get("auc")
        if y.any() and not y.all():
            fpr, tpr, _ = roc_points(p[known[:, j], j], y)
            fpr, tpr = _thin(fpr, tpr)
            ax.plot(fpr, tpr, lw=1.2)
            ax.set_title(f"{name}" + (f"\nAUC {auc:.3f}" if auc is not None else ""), fontsize=8)
        else:
            ax.text(0.5, 0.5, "undefined\n(one class)", ha="center", va="center", fontsize=8)
            ax.set_title(name, fontsize=8)
        ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1))
        ax.tick_params(labelsize=6)
    for ax in axes[len(label_names):]:
        ax.set_visible(False)
    fig.supxlabel("false positive rate", fontsize=8)
    fig.supylabel("true positive rate", fontsize=8)
    return _save(fig, path)


def plot_auc_bars(path, per_label: dict) -> Path:
    """Horizontal per-label AUC bars with bootstrap CI error bars where present; undefined labels marked."""
    names = list(per_label)
    auc = np.array([np.nan if per_label[n].get("auc") is None else per_label[n]["auc"] for n in names])
    fig = _figure(6, 0.3 * len(names) + 1.2)
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.barh(y, np.nan_to_num(auc, nan=0.0), color="tab:blue", alpha=0.8)
    cis = [per_label[n].get("auc_ci") for n in names]
    for i, ci in enumerate(cis):
        if ci and ci[0] is not None and np.isfinite(auc[i]):
            ax.errorbar(auc[i], i, xerr=[[auc[i] - ci[0]], [ci[1] - auc[i]]], fmt="none", ecolor="k", capsize=2)
        if not np.isfinite(auc[i]):
            ax.text(0.51, i, "undefined", va="center", fontsize=7, color="grey")
    ax.axvline(0.5, ls=":", c="grey")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0.5 if np.nanmin(np.r_[auc, 1.0]) >= 0.5 else 0.0, 1.0)
    ax.set_xlabel("ROC AUC")
    return _save(fig, path)


def _heatmap(fig: Figure, ax, matrix: np.ndarray, names, title: str) -> None:
    m = np.asarray(matrix, dtype=np.float64)
    symmetric = np.nanmin(m, initial=0.0) < 0
    vmax = np.nanmax(np.abs(m), initial=1e-12) if symmetric else max(np.nanmax(m, initial=0.0), 1e-12)
    image = ax.imshow(m, cmap="RdBu_r" if symmetric else "viridis", vmin=-vmax if symmetric else 0, vmax=vmax)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)


def plot_matrices(path, matrices: dict, label_names) -> Path:
    """Side-by-side L×L heatmaps (e.g. a learned label correlation next to the data co-occurrence)."""
    fig = _figure(4.6 * len(matrices), 4.4)
    axes = fig.subplots(1, len(matrices), squeeze=False).ravel()
    for ax, (title, matrix) in zip(axes, matrices.items()):
        _heatmap(fig, ax, matrix, label_names, title)
    return _save(fig, path)


def plot_cooccurrence(path, targets, mask, label_names) -> Path:
    """Training-label co-occurrence P(j | i): row i = images where label i is positive. The diagonal
    (trivially 1) is blanked so the off-diagonal structure gets the colour range."""
    matrix = label_cooccurrence(targets, mask)
    np.fill_diagonal(matrix, np.nan)
    return plot_matrices(path, {"training co-occurrence P(col | row), diagonal blank": matrix}, label_names)


METRIC_WORDS = ("auc", "f1", "map", "acc", "precision", "recall")
SKIP_WORDS = ("time", "sec", "step", "throughput", "images", "memory")  # bookkeeping, not curves


def _series(history: list[dict], key: str):
    pts = [(h.get("epoch", i), h[key]) for i, h in enumerate(history) if _numeric(h.get(key))]
    return [x for x, _ in pts], [y for _, y in pts]


def _numeric(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _panels(keys: list[str]) -> list[tuple[str, list[str], bool]]:
    """(title, keys, log-scale): losses (total and per term), quality metrics, learning rates."""
    lrs = [k for k in keys if k == "lr" or k.startswith(("lr", "learning_rate"))]
    metrics = [k for k in keys if k not in lrs and any(w in k.lower() for w in METRIC_WORDS)]
    losses = [k for k in keys if k not in lrs and k not in metrics]
    return [(t, ks, log) for t, ks, log in (("losses", losses, False), ("metrics", metrics, False),
                                            ("learning rate", lrs, True)) if ks]


def plot_history(path, history: list[dict]) -> Path:
    """Training curves from per-epoch dicts: losses (total and per term), validation metrics and the
    learning rate in separate panels, so a per-term loss is not squashed by an AUC axis."""
    keys = list(dict.fromkeys(k for h in history for k, v in h.items() if k != "epoch" and _numeric(v)
                              and not any(w in k.lower() for w in SKIP_WORDS)))
    panels = _panels(keys)
    fig = _figure(4.6 * max(1, len(panels)), 3.6)
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False).ravel()
    for ax, (title, ks, log) in zip(axes, panels):
        for k in ks:
            ax.plot(*_series(history, k), marker="o", ms=2.5, lw=1.2, label=k)
        ax.set(title=title, xlabel="epoch")
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    return _save(fig, path)
