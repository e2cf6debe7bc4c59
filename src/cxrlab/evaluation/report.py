"""A run's report directory: metrics.json, config.json, report.md and the plots it links.

Every run writes one, so a reader can see what was trained and how well it did without rerunning it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from . import plots
from .protocol import protocol_line
from ..metrics.subgroups import format_subgroups
from ..serialization import to_jsonable

HEADLINE = (("macro_auc", "macro AUC"), ("micro_auc", "micro AUC"), ("map", "mAP"),
            ("macro_f1", "macro F1, thresholds fitted on validation"),
            ("micro_f1", "micro F1, thresholds fitted on validation"),
            ("macro_f1_at_0.5", "macro F1 @0.5 (fixed threshold)"), ("micro_f1_at_0.5", "micro F1 @0.5 (fixed threshold)"))
# the LCL paper (Zhang et al., CMPB 2024) states F1 as its headline, and its group's code takes it at 0.5
LCL_HEADLINE = ("macro_f1_at_0.5", "micro_f1_at_0.5")


def write_json(path: Path, obj) -> Path:
    """Strict JSON (NaN written as null), so any JSON reader can load it."""
    path.write_text(json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")
    return path


def write_report(out_dir, metrics: dict, probs, targets, mask, label_names, config: dict | None = None,
                 history: list[dict] | None = None, train_targets=None, train_mask=None) -> Path:
    """Write the report directory for ``metrics`` (from ``multilabel_report``) and return report.md's path.

    ``probs``/``targets``/``mask`` are the evaluated set (for ROC curves); ``train_targets``/``train_mask``
    the training labels (for the co-occurrence heatmap); ``history`` per-epoch dicts (training curves).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [str(n) for n in label_names]
    write_json(out / "metrics.json", metrics)
    if config is not None:
        write_json(out / "config.json", config)
    figures = {"ROC curves": plots.plot_roc_curves(out / "roc_curves.png", probs, targets, mask, names,
                                                   metrics.get("per_label")),
               "Per-label AUC": plots.plot_auc_bars(out / "auc_bars.png", metrics["per_label"])}
    if "calibration" in metrics:
        figures["Reliability diagram (equal-mass bins)"] = plots.plot_reliability(
            out / "reliability.png", probs, targets, mask, names, bins=metrics["calibration"]["bins"])
    if train_targets is not None:
        figures["Training label co-occurrence P(column | row)"] = plots.plot_cooccurrence(
            out / "cooccurrence.png", train_targets, train_mask, names)
    if history:
        figures["Training curves"] = plots.plot_history(out / "training_curves.png", history, metrics.get("selection"))
    path = out / "report.md"
    path.write_text(report_markdown(metrics, names, config, figures))
    return path


def _num(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def _ci(ci) -> str:
    return f"[{_num(ci[0])}, {_num(ci[1])}]" if ci and ci[0] is not None else ""


def report_markdown(metrics: dict, label_names, config: dict | None, figures: dict) -> str:
    """The Markdown summary: headline metrics (with CI), per-label table, undefined labels, plots."""
    title = (config or {}).get("name", "evaluation")
    lines = [f"# Report: {title}", ""] + ([protocol_line(metrics["protocol"]), ""] if metrics.get("protocol") else [])
    boot = metrics.get("bootstrap")
    facts = [f"{metrics.get('n_images', '?')} images evaluated",
             f"thresholds: {metrics.get('threshold_source', 'given')}"]
    if boot:
        facts.append(f"{int(boot['ci'] * 100)}% bootstrap CIs from {boot['resamples']} image resamples "
                     f"(seed {boot['seed']})")
    if metrics.get("split_sizes"):
        facts.append("split sizes: " + ", ".join(f"{k} {v}" for k, v in metrics["split_sizes"].items()))
    lines += [f"- {f}" for f in facts] + ["", "## Headline metrics", ""] + _headline_table(metrics, config)
    undefined = metrics.get("undefined_labels") or []
    lines += ["", "Macro averages skip labels lacking both classes: "
              + (", ".join(undefined) if undefined else "none") + "."]
    lines += _reliability_note(metrics) + [""]
    lines += _per_label_table(metrics["per_label"], label_names)
    lines += _calibration_table(metrics, label_names)
    if metrics.get("study"):
        resampled = "; bootstrap CIs resample studies" if metrics["study"].get("bootstrap") else ""
        lines += ["", f"### Study level: {metrics['study']['n_studies']} studies "
                  f"(thresholds: {metrics['study'].get('threshold_source', 'given')}{resampled})", ""]
        lines += _per_label_table(metrics["study"]["per_label"], label_names)[2:]
    if metrics.get("subgroups"):
        lines += ["", "## Subgroups (test images)"] + format_subgroups(metrics["subgroups"])
    for caption, fig in figures.items():
        lines += ["", f"## {caption}", "", f"![{caption}]({Path(fig).name})"]
    return "\n".join(lines) + "\n"


def _headline_table(metrics: dict, config: dict | None) -> list[str]:
    """One row per headline metric; a ``study`` block adds its columns beside the image level's, each
    headed by its count. A LCL recipe's report puts F1 @0.5, the paper's headline, first and says so."""
    study = metrics.get("study")
    lcl = ((config or {}).get("model") or {}).get("head") == "lcl"
    rows = sorted(HEADLINE, key=lambda kv: kv[0] not in LCL_HEADLINE) if lcl else HEADLINE
    head = f"| metric | image level ({metrics.get('n_images', '?')} images) | CI |"
    if study:
        head += f" study level ({study['n_studies']} studies, {study['aggregation']}) | CI |"
    lines = [head, "|---|---:|---|" + ("---:|---|" if study else "")]
    for key, label in rows:
        if key not in metrics:
            continue
        label = f"**{label}: the LCL paper's headline**" if lcl and key in LCL_HEADLINE else label
        row = f"| {label} | {_num(metrics[key], 4)} | {_ci(metrics.get(key + '_ci'))} |"
        if study:
            row += f" {_num(study.get(key), 4)} | {_ci(study.get(key + '_ci'))} |"
        lines.append(row)
    return lines


def _reliability_note(metrics: dict) -> list[str]:
    """Which labels have too few positives for their AUC to mean much, and whether the macro kept them."""
    floor = metrics.get("min_positives") or 0
    if floor <= 0:
        return []
    flagged = metrics.get("unreliable_labels") or []
    if not flagged:
        return ["", f"Every label has at least {floor} positives among the evaluated images."]
    counts = ", ".join(f"{n} (n+ = {metrics['per_label'].get(n, {}).get('n_positive', '?')})" for n in flagged)
    verdict = ("left out of the macro averages above" if metrics.get("macro_excludes_unreliable")
               else "still included in the macro averages above (eval.exclude_unreliable=true leaves them out)")
    return ["", f"**Unreliable (†): fewer than {floor} positives among the evaluated images**: {counts}. "
            f"Their AUC, CI and F1 rest on too few images to mean much; they are {verdict}."]


def _per_label_table(per_label: dict, label_names) -> list[str]:
    lines = ["## Per label", "", "| label | AUC [CI] | AP | F1 | threshold | sensitivity | specificity | n+ | n− |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in label_names:
        m = per_label.get(name, {})
        auc = _num(m.get("auc")) + (f" {_ci(m.get('auc_ci'))}" if m.get("auc_ci") else "")
        if m.get("auc") is None:
            auc = "undefined"
        shown = f"{name} †" if plots.unreliable(m) else name
        lines.append(f"| {shown} | {auc} | {_num(m.get('ap'))} | {_num(m.get('f1'))} | {_num(m.get('threshold'))} "
                     f"| {_num(m.get('sensitivity'))} | {_num(m.get('specificity'))} "
                     f"| {m.get('n_positive', '–')} | {m.get('n_negative', '–')} |")
    return lines


def _calibration_table(metrics: dict, label_names) -> list[str]:
    """ECE (equal-mass bins, the count stated) and Brier score per label and their means over labels."""
    if "calibration" not in metrics:
        return []
    bins = metrics["calibration"]["bins"]
    lines = ["", "## Calibration", "", f"ECE over {bins} equal-mass bins of the predicted probability "
             "(|mean predicted − observed frequency| per bin, weighted by bin size) and Brier score "
             "(mean squared error of the probability), over each label's known entries; lower is better.", "",
             "| label | ECE | Brier |", "|---|---:|---:|",
             f"| **mean over labels** | {_num(metrics.get('mean_ece'))} | {_num(metrics.get('mean_brier'))} |"]
    for name in label_names:
        m = metrics["per_label"].get(name, {})
        lines.append(f"| {name} | {_num(m.get('ece'))} | {_num(m.get('brier'))} |")
    return lines
