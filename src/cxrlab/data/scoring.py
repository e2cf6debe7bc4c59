"""A labelled source read the way a model was trained (its card's views, MIMIC labeller, policy and
input spec) and paired to its labels: what ``evaluate`` scores and ``calibrate`` refits on."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CxrlabError
from ..labels import LabelSpace, label_pairs
from ..model_card import InputSpec, ModelCard
from .policies import apply_policy
from .preprocess import preprocess_record
from .records import Records
from .sources import parse_source


@dataclass
class ScoringSet:
    """Images ``records`` row ``rows[i]`` with ``target``/``mask`` for the report labels ``names``;
    ``outputs[k]`` is the model output scored as ``names[k]``; ``mapped`` says which pairs went through
    the NIH↔CheXpert mapping, ``unscored`` which model labels the source cannot score."""

    records: Records
    rows: np.ndarray
    names: list[str]
    outputs: list[int]
    target: np.ndarray
    mask: np.ndarray
    mapped: dict
    unscored: list[str]

    def fitted(self, spec: InputSpec, i: int) -> np.ndarray:
        """Image ``i`` as the model's input (the one preprocessing path)."""
        return preprocess_record(spec, self.records, int(self.rows[i]))


def scoring_set(card: ModelCard, source: str, split: str = "all", policy: str | None = None) -> ScoringSet:
    """The source read with the views and MIMIC labeller the model was trained on, labelled by its
    training policy (single-positive training scores against U-Zeros) unless ``policy`` is given."""
    label_names, trained = card.labels, card.training
    records = parse_source(source, views=trained.views, labeller=trained.labeller)
    if split != "all":
        if "split" not in records.meta.columns:
            raise CxrlabError(f"--split {split}: source {source!r} has no official split")
        records = records.take(np.flatnonzero(records.meta["split"].to_numpy() == split))
    pairs, mapped, unscored = label_pairs(label_names, records.labels.names)
    if not pairs:
        raise CxrlabError(f"none of the checkpoint's labels {list(label_names)} is labelled by source "
                          f"{source!r} (its labels: {list(records.labels.names)}), even through the "
                          "NIH↔CheXpert mapping")
    names = [n for _, _, n in pairs]
    result = apply_policy(records.values[:, [c for _, c, _ in pairs]], LabelSpace("checkpoint", tuple(names)),
                          policy or trained.policy.replace("spml", "u_zeros"))
    return ScoringSet(records, result.rows, names, [o for o, _, _ in pairs], result.target, result.mask,
                      mapped, unscored)
