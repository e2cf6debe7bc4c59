"""``cxrlab evaluate``: score a checkpoint on a labelled source at its own thresholds, and write a report.

The source is read as the model was trained (the recipe's views and MIMIC labeller). Labels are matched
by name; where the vocabularies differ (a NIH model on CheXpert, or the reverse) the explicit mapping
of :data:`cxrlab.labels.NIH_TO_CHEXPERT` pairs them (:func:`cxrlab.labels.label_pairs`), and the report
says which labels were mapped and which could not be scored.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CxrlabError
from ..labels import label_pairs


def evaluate_checkpoint(checkpoint: Path, source: str, out_dir: Path, policy: str | None = None,
                        split: str = "all") -> Path:
    """Score a checkpoint on a labelled source (at the checkpoint's thresholds) and write a report."""
    from ..data.policies import apply_policy
    from ..data.sources import parse_source
    from ..evaluation.report import write_report
    from ..inference.predictor import Predictor
    from ..labels import LabelSpace
    from ..metrics import multilabel_report

    predictor = Predictor.from_checkpoint(checkpoint)
    data = predictor.info["recipe"]["data"]
    records = parse_source(source, views=data.get("views"), labeller=data.get("labeller", "chexpert"))
    if split != "all":
        if "split" not in records.meta.columns:
            raise CxrlabError(f"--split {split}: source {source!r} has no official split")
        records = records.take(np.flatnonzero(records.meta["split"].to_numpy() == split))
    pairs, mapped, unscored = label_pairs(predictor.label_names, records.labels.names)
    if not pairs:
        raise CxrlabError(f"none of the checkpoint's labels {predictor.label_names} is labelled by source "
                          f"{source!r} (its labels: {list(records.labels.names)}), even through the "
                          "NIH↔CheXpert mapping")
    outputs = [o for o, _, _ in pairs]
    names = [n for _, _, n in pairs]
    labels = LabelSpace("checkpoint", tuple(names))
    result = apply_policy(records.values[:, [c for _, c, _ in pairs]], labels,
                          policy or data["policy"].replace("spml", "u_zeros"))
    rows = result.rows
    probs = predictor.predict_read(lambda i: records.read(int(rows[i])), len(rows))[:, outputs]
    evaluation = predictor.info["recipe"].get("eval", {})  # the training recipe's reliability floor
    metrics = multilabel_report(probs, result.target, result.mask, names,
                                thresholds=predictor.thresholds[outputs],
                                min_positives=evaluation.get("min_positives", 10),
                                exclude_unreliable=evaluation.get("exclude_unreliable", False))
    metrics["threshold_source"] = "the checkpoint's (fitted on its training run's validation part)"
    if mapped:
        metrics["label_mapping"] = mapped
    if unscored:
        metrics["unscored_labels"] = unscored
    return write_report(Path(out_dir), metrics, probs, result.target, result.mask, names,
                        config=predictor.info["recipe"])
