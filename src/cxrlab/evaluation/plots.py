"""Report figures, drawn on matplotlib's Agg canvas (no display, no global pyplot state, safe in workers)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..labels import label_cooccurrence
from ..metrics.calibration import DEFAULT_BINS, expected_calibration_error, reliability_bins
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


def unreliable(entry: dict) -> bool:
    """A per-label report entry whose AUC rests on too few positives (``multilabel_report``'s
    ``min_positives``); reports written before the flag existed count as reliable."""
    return entry.get("auc") is not None and entry.get("reliable") is False


def plot_roc_curves(path, probs, targets, mask, label_names, per_label: dict | None = None) -> Path:
    """ROC curve per label as small multiples, titled with the AUC; undefined labels say so, and labels
    with too few positives are drawn grey and marked † with their positive count."""
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
            flagged = unreliable((per_label or {}).get(name, {}))
            ax.plot(fpr, tpr, lw=1.2, color="grey" if flagged else "tab:blue")
            note = f" † n+={int(y.sum())}, unreliable" if flagged else ""
            ax.set_title(f"{name}" + (f"\nAUC {auc:.3f}{note}" if auc is not None else ""), fontsize=8,
                         color="grey" if flagged else "black")
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
    """Horizontal per-label AUC bars with bootstrap CI error bars where present; undefined labels marked,
    labels with too few positives grey, hatched and marked † with their positive count."""
    names = list(per_label)
    auc = np.array([np.nan if per_label[n].get("auc") is None else per_label[n]["auc"] for n in names])
    flagged = [unreliable(per_label[n]) for n in names]
    fig = _figure(6, 0.3 * len(names) + 1.2)
    ax = fig.add_subplot()
    y = np.arange(len(names))
    bars = ax.barh(y, np.nan_to_num(auc, nan=0.0), color=["lightgrey" if f else "tab:blue" for f in flagged],
                   alpha=0.8)
    for bar, f, name in zip(bars, flagged, names):
        if f:
            bar.set_hatch("//")
            ax.text(0.995, bar.get_y() + bar.get_height() / 2, f"† n+ = {per_label[name].get('n_positive', '?')}: "
                    "unreliable", va="center", ha="right", fontsize=7, color="dimgrey",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1})
    cis = [per_label[n].get("auc_ci") for n in names]
    for i, ci in enumerate(cis):
        if ci and ci[0] is not None and np.isfinite(auc[i]):
            ax.errorbar(auc[i], i, xerr=[[auc[i] - ci[0]], [ci[1] - auc[i]]], fmt="none", ecolor="k", capsize=2)
        if not np.isfinite(auc[i]):
            ax.text(0.51, i, "undefined", va="center", fontsize=7, color="grey")
    ax.axvline(0.5, ls=":", c="grey")
    ax.set_yticks(y, [f"{n} †" if f else n for n, f in zip(names, flagged)], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0.5 if np.nanmin(np.r_[auc, 1.0]) >= 0.5 else 0.0, 1.0)
    ax.set_xlabel("ROC AUC")
    return _save(fig, path)


def plot_reliability(path, probs, targets, mask, label_names, bins: int = DEFAULT_BINS, top: int = 5) -> Path:
    """Reliability diagram over equal-mass bins: all labels' known entries pooled, then the ``top`` most
    prevalent labels; each panel's title gives its ECE, a point is one bin (mean predicted, observed
    frequency) and the dotted diagonal is perfect calibration."""
    p, t, known = check_inputs(probs, targets, mask, label_names)
    prevalence = [t[known[:, j], j].mean() if known[:, j].any() else -1.0 for j in range(p.shape[1])]
    chosen = [j for j in np.argsort(prevalence, kind="stable")[::-1][:top] if prevalence[j] >= 0]
    panels = [("all labels pooled", p[known], t[known])]
    panels += [(label_names[j], p[known[:, j], j], t[known[:, j], j]) for j in chosen]
    rows, cols = _grid(len(panels))
    fig = _figure(2.6 * cols, 2.5 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (title, x, y) in zip(axes, panels):
        curve = reliability_bins(x, y, bins)
        ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=0.8)
        ax.plot(curve["mean_predicted"], curve["observed"], "o-", ms=3, lw=1.2, color="tab:blue")
        ax.set_title(f"{title}\nprevalence {y.mean():.2f}, ECE {expected_calibration_error(x, y, bins):.3f}, "
                     f"n {x.size}", fontsize=8)
        ax.set(xlim=(0, 1), ylim=(0, 1))
        ax.tick_params(labelsize=6)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.supxlabel(f"mean predicted probability ({bins} equal-mass bins)", fontsize=8)
    fig.supylabel("observed frequency", fontsize=8)
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


TRAIN_LOSS_TITLE = "training objective (the recipe's loss terms, weighted)"
VAL_LOSS_TITLE = "validation loss (masked BCE, unweighted)"
METRIC_WORDS = ("auc", "f1", "map", "acc", "precision", "recall")
SKIP_WORDS = ("time", "sec", "step", "memory")  # bookkeeping, not curves


def _is_rate(key: str) -> bool:
    """Throughput such as ``train_img_s`` (images per second): hundreds, not a loss's ~1."""
    k = key.lower()
    return k.endswith("_s") or "per_s" in k or "throughput" in k


def _series(history: list[dict], key: str):
    pts = [(h.get("epoch", i), h[key]) for i, h in enumerate(history) if _numeric(h.get(key))]
    return [x for x, _ in pts], [y for _, y in pts]


def _numeric(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _panels(keys: list[str]) -> list[tuple[str, list[str], bool]]:
    """(title, keys, log-scale): losses (total and per term: ``*loss*``, ``train_*``, ``val_*``), quality
    metrics, learning rates, throughput, and any other statistic, each on its own axis."""
    lrs = [k for k in keys if k == "lr" or k.startswith(("lr", "learning_rate"))]
    rates = [k for k in keys if k not in lrs and _is_rate(k)]
    metrics = [k for k in keys if k not in lrs + rates and any(w in k.lower() for w in METRIC_WORDS)]
    rest = [k for k in keys if k not in lrs + rates + metrics]
    losses = [k for k in rest if "loss" in k.lower() or k.startswith(("train_", "val_"))]
    other = [k for k in rest if k not in losses]
    # the training objective is the recipe's weighted loss terms, the validation loss an unweighted masked
    # BCE: different quantities, so never on one axis
    val_losses = [k for k in losses if k.startswith("val_")]
    train_losses = [k for k in losses if k not in val_losses]
    return [(t, ks, log) for t, ks, log in ((TRAIN_LOSS_TITLE, train_losses, False), (VAL_LOSS_TITLE, val_losses, False),
                                            ("metrics", metrics, False),
                                            ("learning rate", lrs, True), ("throughput (per second)", rates, False),
                                            ("other statistics", other, False)) if ks]


def history_panels(history: list[dict]) -> list[tuple[str, list[str], bool]]:
    """The panels ``plot_history`` draws: (title, keys, log-scale) of the numeric, non-bookkeeping keys."""
    keys = list(dict.fromkeys(k for h in history for k, v in h.items() if k != "epoch" and _numeric(v)
                              and not any(w in k.lower() for w in SKIP_WORDS)))
    return _panels(keys)


def plot_history(path, history: list[dict], selected: dict | None = None) -> Path:
    """Training curves from per-epoch dicts: the training objective, the validation loss, validation
    metrics, the learning rate, throughput and other statistics in separate labelled panels, so a loss is
    squashed neither by an AUC axis nor by images per second, and the weighted training objective is not
    read against the unweighted validation BCE. ``selected`` ({"epoch", "on"}) marks the epoch whose
    weights were kept on every panel."""
    panels = history_panels(history)
    fig = _figure(4.6 * max(1, len(panels)), 3.8)
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False).ravel()
    epoch = (selected or {}).get("epoch")
    for ax, (title, ks, log) in zip(axes, panels):
        for k in ks:
            ax.plot(*_series(history, k), marker="o", ms=2.5, lw=1.2, label=k)
        if epoch is not None:
            ax.axvline(epoch, color="tab:red", ls="--", lw=1.0,
                       label=f"selected: epoch {epoch} (best {selected.get('on', 'validation score')})")
        ax.set_title(title, fontsize=9)
        ax.set(xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    return _save(fig, path)
