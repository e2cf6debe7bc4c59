"""``cxrlab evaluate``: score a checkpoint on a labelled source at its own thresholds, and write a report.

The source is read as the model was trained (its model card's views, MIMIC labeller and input spec). Labels are matched
by name; where the vocabularies differ (a NIH model on CheXpert, or the reverse) the explicit mapping
of :data:`cxrlab.labels.NIH_TO_CHEXPERT` pairs them (:mod:`cxrlab.data.scoring`), and the report says which labels were mapped and which could not be scored.
"""
from __future__ import annotations

from pathlib import Path

from ..config import EvalConfig, load_recipe
from ..data.scoring import scoring_set
from ..errors import CxrlabError, closest
from ..evaluation.protocol import protocol
from ..evaluation.report import write_report
from ..inference.batch import predict_tolerant
from ..inference.predictor import Predictor
from ..metrics import multilabel_report
from ..metrics.study import study_level, study_report
from ..model_card import card_to_json
from ..paths import check_output_dir


# the eval.* keys that mean something without a validation part or training: the rest are refused by name
EVALUATE_KEYS = ("bootstrap", "ci", "min_positives", "exclude_unreliable", "level", "study_aggregation")


def evaluate_checkpoint(checkpoint: Path, source: str, out_dir: Path, policy: str | None = None,
                        split: str = "all", overwrite: bool = True, level: str = "auto",
                        aggregation: str = "max", overrides=()) -> Path:
    """Score a checkpoint (or an ONNX export) on a labelled source at its card's thresholds and write a
    report (an existing ``out_dir`` is refused unless ``overwrite``); an image that cannot be read is an
    error naming it. ``level``/``aggregation`` as ``eval.level``/``eval.study_aggregation``: where studies
    hold several images the report adds the study level (no validation part here, so its F1 uses the
    model's image-level thresholds, and says so). ``overrides``: ``eval.KEY=VALUE`` for the keys of
    ``EVALUATE_KEYS`` (bootstrap CIs, the unreliable-label floor and whether macro averages leave those
    labels out, level, aggregation); by default the training recipe's floor and choice, no bootstrap."""
    check_output_dir(out_dir, overwrite=overwrite, what="evaluation folder")
    predictor = Predictor.load(checkpoint)
    card = predictor.card
    e = _eval_settings(card, level, aggregation, overrides)
    scored = scoring_set(card, source, split, policy)
    probs = predict_tolerant(predictor, len(scored.rows), lambda i: scored.fitted(card.input, i), strict=True,
                             progress="evaluate")[0]
    probs = probs[:, scored.outputs]
    report_args = dict(bootstrap=e.bootstrap, ci=e.ci, min_positives=e.min_positives,
                       exclude_unreliable=e.exclude_unreliable)
    metrics = multilabel_report(probs, scored.target, scored.mask, scored.names,
                                thresholds=predictor.thresholds[scored.outputs], **report_args)
    metrics["threshold_source"] = f"the model's: {card.threshold_source}"
    if scored.mapped:
        metrics["label_mapping"] = scored.mapped
    if scored.unscored:
        metrics["unscored_labels"] = scored.unscored
    meta = scored.records.meta.iloc[scored.rows]
    ids = meta["study_id"].to_numpy(dtype=str)
    aggregation = str(e.study_aggregation)
    if study_level(e.level, ids):
        metrics["study"] = study_report(probs, scored.target, scored.mask, ids, scored.names, how=aggregation,
                                        thresholds=predictor.thresholds[scored.outputs], **report_args)
        metrics["study"]["threshold_source"] = (f"the model's image-level ones ({card.threshold_source}); "
                                                "none fitted on studies here")
    what = f"{split} part of {source}" if split != "all" else f"all of {source}"
    level_text = f"image + study ({aggregation} of a study's images)" if "study" in metrics else "image"
    metrics["protocol"] = protocol(what, level_text, card.input.size, card.input.resize,
                                   policy or card.training.policy.replace("spml", "u_zeros"), len(scored.names), meta)
    return write_report(Path(out_dir), metrics, probs, scored.target, scored.mask, scored.names,
                        config={"name": card.training.recipe or "evaluation", "model_card": card_to_json(card)})


def _eval_settings(card, level: str, aggregation: str, overrides) -> EvalConfig:
    """The eval section evaluate works with: the training recipe's floor and exclusion, ``level`` and
    ``aggregation``, no bootstrap, then the ``eval.*`` overrides (checked and typed as a recipe's are)."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        section, _, name = key.partition(".")
        if section != "eval" or name not in EVALUATE_KEYS:
            accepted = [f"eval.{k}" for k in EVALUATE_KEYS]
            hint = closest(key, accepted)
            raise CxrlabError(f"evaluate: {key!r} cannot be set here" + (f"; did you mean {hint!r}?" if hint else "")
                              + f" (evaluate takes {', '.join(accepted)}, e.g. eval.bootstrap=1000)")
    t = card.training
    base = [f"eval.min_positives={t.min_positives}", f"eval.exclude_unreliable={str(t.exclude_unreliable).lower()}",
            f"eval.level={level}", f"eval.study_aggregation={aggregation}", "eval.bootstrap=0"]
    return load_recipe(None, [*base, *overrides]).eval
