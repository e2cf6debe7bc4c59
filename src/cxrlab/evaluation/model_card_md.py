"""MODEL_CARD.md: a model's release page, built only from the run's own files.

Sources: the model card a checkpoint.json or an ONNX sidecar holds (:mod:`cxrlab.model_card`: labels,
thresholds and their source, input, backbones, head, training provenance, versions), the run's
report/metrics.json (test metrics with their bootstrap CIs, protocol, split sizes, calibration,
subgroups) and the files' SHA-256. Nothing is computed here that those files do not hold; every
number is printed from them (4 decimals), so the card can be checked against metrics.json.

Sections: intended use (research only), model, training data, labels and thresholds, test metrics,
calibration and subgroups when present, known limits, versions and hashes.
"""
from __future__ import annotations

import math

from ..model_card import ModelCard
from .protocol import protocol_line

STATEMENT = ("**Research use only, not for diagnosis.** This model is not a medical device; its outputs must "
             "not inform the care of any patient.")
HEADLINE = (("macro_auc", "macro AUC"), ("micro_auc", "micro AUC"), ("map", "mAP"),
            ("macro_f1", "macro F1 (validation-fitted thresholds)"),
            ("micro_f1", "micro F1 (validation-fitted thresholds)"),
            ("macro_f1_at_0.5", "macro F1 @0.5"), ("micro_f1_at_0.5", "micro F1 @0.5"))
PER_LABEL = ("auc", "ap", "f1", "sensitivity", "specificity")


def num(x) -> str:
    """Every number of the card: 4 decimals, '–' where metrics.json holds none."""
    if x is None or isinstance(x, bool) or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.4f}"


def ci(pair) -> str:
    return f"[{num(pair[0])}, {num(pair[1])}]" if pair and pair[0] is not None else ""


def card_markdown(card: ModelCard, metrics: dict | None, files: dict, export: dict | None = None) -> str:
    """The Markdown page. ``metrics``: metrics.json (None when the run's report is not found); ``files``:
    name -> (path, SHA-256) of what the card was built from; ``export``: the ONNX sidecar's export facts."""
    m = metrics or {}
    t = card.training
    name = t.recipe or "model"
    lines = [f"# Model card: {name}", "", STATEMENT, ""]
    lines += _intended_use(card)
    lines += ["", "## Model", "",
              f"- architecture: {' + '.join(card.backbones) or '?'} backbone(s), `{card.head or '?'}` head",
              f"- input: {card.input.size}×{card.input.size} px grey ({card.input.resize}), normalisation mean "
              f"{', '.join(num(v) for v in card.input.mean) or '–'}, std {', '.join(num(v) for v in card.input.std) or '–'}",
              f"- output: {len(card.labels)} independent sigmoid probabilities"
              + (", per-label temperature applied (calibrated)" if card.temperature is not None else "")]
    lines += _training_data(card, m)
    lines += _labels(card, m)
    if m:
        lines += _metrics(m, card.labels)
        lines += _calibration(m, card.labels)
        if m.get("subgroups"):
            lines += _subgroups(m["subgroups"])
    else:
        lines += ["", "## Test metrics", "", "No metrics.json was found beside this model (its run's report/ "
                  "folder), so this card has no test metrics."]
    lines += _limits(card, m)
    lines += _versions(card, files, export)
    return "\n".join(lines) + "\n"


def _intended_use(card: ModelCard) -> list[str]:
    source = card.training.source
    out = ["## Intended use", "",
           f"Research on multi-label chest X-ray classification: the {len(card.labels)} findings below, from one "
           "frontal or lateral radiograph, as probabilities and thresholded decisions for studies of methods, "
           "data and evaluation protocols. Out of scope: any clinical use, triage or screening, and images "
           "unlike its training data (other modalities, children, other sites) without evaluation there."]
    if source.lower().startswith("synthetic"):
        out += ["", f"Trained on cxrlab's synthetic radiographs (`{source}`): a check that the method trains, "
                "not a model of real X-rays; its outputs say nothing about real patients."]
    return out


def _training_data(card: ModelCard, m: dict) -> list[str]:
    t = card.training
    out = ["", "## Training data", "",
           f"- source: `{t.source or 'not recorded'}`" + (f" (views: {t.views})" if t.views else ""),
           f"- uncertain-label policy: `{t.policy}`" + (f", MIMIC labeller `{t.labeller}`"
                                                          if t.source.startswith("mimic") else "")]
    sizes = m.get("split_sizes")
    if sizes:
        out.append("- images per part: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    protocol = m.get("protocol")
    if protocol:
        out.append("- " + protocol_line(protocol).replace("**Protocol**", "protocol of the test metrics"))
    epochs = f"{t.epochs} epoch(s)" if t.epochs else "epochs not recorded"
    selection = m.get("selection")
    if selection:
        epochs += f"; weights of epoch {selection.get('epoch')}, selected on {selection.get('on')}"
    out.append(f"- training: {epochs}" + (f"; written {t.date}" if getattr(t, "date", "") else ""))
    return out


def _labels(card: ModelCard, m: dict) -> list[str]:
    per_label = m.get("per_label") or {}
    thresholds = card.output_thresholds()  # what predict decides at (0.5 where none were fitted)
    out = ["", "## Labels and thresholds", "",
           f"A label is positive at probability >= its threshold. Thresholds: {card.threshold_source}."]
    if m.get("threshold_source"):
        out += ["", f"The test metrics used the thresholds in metrics.json ({m['threshold_source']})."]
    out += ["", "| label | threshold | test n+ | test n− |", "|---|---:|---:|---:|"]
    for label, threshold in zip(card.labels, thresholds):
        row = per_label.get(label, {})
        out.append(f"| {label} | {num(float(threshold))} | {row.get('n_positive', '–')} | {row.get('n_negative', '–')} |")
    return out


def _metrics(m: dict, labels) -> list[str]:
    boot = m.get("bootstrap")
    how = (f"{int(boot['ci'] * 100)}% bootstrap CIs from {boot['resamples']} image resamples (seed {boot['seed']})"
           if boot else "no bootstrap CIs")
    study = m.get("study")
    out = ["", "## Test metrics", "", f"On {m.get('n_images', '?')} test images; {how}.", ""]
    head = "| metric | image level | CI |" + (f" study level ({study['n_studies']} studies) | CI |" if study else "")
    out += [head, "|---|---:|---|" + ("---:|---|" if study else "")]
    for key, label in HEADLINE:
        if key in m:
            row = f"| {label} | {num(m[key])} | {ci(m.get(key + '_ci'))} |"
            if study:
                row += f" {num(study.get(key))} | {ci(study.get(key + '_ci'))} |"
            out.append(row)
    out += ["", "| label | AUC | AUC CI | AP | F1 | sensitivity | specificity |", "|---|---:|---|---:|---:|---:|---:|"]
    for label in labels:
        row = (m.get("per_label") or {}).get(label)
        if row is None:
            continue
        out.append(f"| {label} | {num(row.get('auc'))} | {ci(row.get('auc_ci'))} | {num(row.get('ap'))} | "
                   f"{num(row.get('f1'))} | {num(row.get('sensitivity'))} | {num(row.get('specificity'))} |")
    return out


def _calibration(m: dict, labels) -> list[str]:
    if "mean_ece" not in m:
        return []
    bins = (m.get("calibration") or {}).get("bins", "?")
    out = ["", "## Calibration", "", f"ECE ({bins} equal-mass bins) and Brier score on the test images; lower is "
           "better.", "", "| label | ECE | Brier |", "|---|---:|---:|",
           f"| mean over labels | {num(m.get('mean_ece'))} | {num(m.get('mean_brier'))} |"]
    for label in labels:
        row = (m.get("per_label") or {}).get(label, {})
        out.append(f"| {label} | {num(row.get('ece'))} | {num(row.get('brier'))} |")
    return out


def _subgroups(block: dict) -> list[str]:
    """Macro AUC per subgroup of each attribute (sex, age band, view) over the attribute's label set."""
    out = ["", "## Subgroups (test images)"]
    for attribute, b in block.items():
        name = attribute.replace("_", " ")
        if "unavailable" in b:
            out += ["", f"By {name}: not reported ({b['unavailable']})."]
            continue
        out += ["", f"By {name}: macro AUC over {', '.join(b['labels']) or 'no label'} ({b['labels_rule']}).", "",
                "| subgroup | images | macro AUC | CI |", "|---|---:|---:|---|"]
        out += [f"| {g} | {row['n_images']} | {num(row['macro_auc'])} | {ci(row.get('macro_auc_ci'))} |"
                for g, row in b["groups"].items()]
    return out


def _limits(card: ModelCard, m: dict) -> list[str]:
    out = ["", "## Known limits", ""]
    floor = m.get("min_positives") or card.training.min_positives
    few = m.get("unreliable_labels") or []
    if few:
        counts = ", ".join(f"{n} (n+ = {(m.get('per_label') or {}).get(n, {}).get('n_positive', '?')})" for n in few)
        out.append(f"- fewer than {floor} test positives, so their AUC, CI and F1 mean little: {counts}")
    if m.get("undefined_labels"):
        out.append("- no AUC at all (the test images lack positives or negatives): " + ", ".join(m["undefined_labels"]))
    for attribute, block in (m.get("subgroups") or {}).items():
        gap = block.get("largest_gap") if isinstance(block, dict) else None
        if gap:
            out.append(f"- largest macro-AUC gap by {attribute.replace('_', ' ')}: {gap['between'][0]} − "
                       f"{gap['between'][1]} = {gap['macro_auc_gap']:+.4f}")
    out.append("- evaluated only on held-out images of its training source; performance at other sites, on other "
               "scanners and populations is unknown")
    if card.training.source.lower().startswith("synthetic"):
        out.append("- trained and tested on synthetic images only")
    return out


def _versions(card: ModelCard, files: dict, export: dict | None) -> list[str]:
    out = ["", "## Versions and hashes", ""]
    out += [f"- {k}: {v}" for k, v in sorted(card.versions.items())]
    for what, (path, sha) in files.items():
        out.append(f"- {what}: `{path}`" + (f", SHA-256 `{sha}`" if sha else ""))
    if export:
        parity = export.get("parity") or {}
        out.append(f"- ONNX export: SHA-256 `{export.get('model_sha256')}`, max |ORT − PyTorch| = "
                   f"{parity.get('max_abs_diff', '?')} on {parity.get('n', '?')} images")
    return out
