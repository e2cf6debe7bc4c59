"""``cxrlab evaluate``: score a checkpoint on a labelled source at its own thresholds, and write a report.

The source is read as the model was trained (the recipe's views and MIMIC labeller). Labels are matched
by name; where the vocabularies differ (a NIH model on CheXpert, or the reverse) the explicit mapping
of :data:`cxrlab.labels.NIH_TO_CHEXPERT` pairs them (:mod:`cxrlab.data.scoring`), and the report says which labels were mapped and which could not be scored.
"""
from __future__ import annotations

from pathlib import Path


def evaluate_checkpoint(checkpoint: Path, source: str, out_dir: Path, policy: str | None = None,
                        split: str = "all") -> Path:
    """Score a checkpoint on a labelled source (at the checkpoint's thresholds) and write a report."""
    from ..data.scoring import scoring_set
    from ..evaluation.report import write_report
    from ..inference.predictor import Predictor
    from ..metrics import multilabel_report

    predictor = Predictor.from_checkpoint(checkpoint)
    scored = scoring_set(predictor.label_names, predictor.info["recipe"]["data"], source, split, policy)
    probs = predictor.predict_read(scored.read, len(scored.rows))[:, scored.outputs]
    evaluation = predictor.info["recipe"].get("eval", {})  # the training recipe's reliability floor
    metrics = multilabel_report(probs, scored.target, scored.mask, scored.names,
                                thresholds=predictor.thresholds[scored.outputs],
                                min_positives=evaluation.get("min_positives", 10),
                                exclude_unreliable=evaluation.get("exclude_unreliable", False))
    metrics["threshold_source"] = "the checkpoint's (fitted on its training run's validation part)"
    if scored.mapped:
        metrics["label_mapping"] = scored.mapped
    if scored.unscored:
        metrics["unscored_labels"] = scored.unscored
    return write_report(Path(out_dir), metrics, probs, scored.target, scored.mask, scored.names,
                        config=predictor.info["recipe"])
