"""Label spaces (ordered label vocabularies) and the explicit mappings between them."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import CxrlabError, unknown

NO_FINDING = "No Finding"


@dataclass(frozen=True)
class LabelSpace:
    """An ordered tuple of label names. Index ``i`` of every target/mask/logit vector is ``names[i]``."""

    name: str
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise CxrlabError(f"label space {self.name!r} repeats a label: {self.names}")

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def index(self, label: str) -> int:
        if label not in self.names:
            raise unknown(f"label in label space {self.name!r}:", label, self.names)
        return self.names.index(label)

    def subset(self, labels: Iterable[str], name: str | None = None) -> "LabelSpace":
        labels = tuple(labels)
        for label in labels:
            self.index(label)
        return LabelSpace(name or f"{self.name}-subset", labels)

    def with_no_finding(self) -> "LabelSpace":
        """This space plus a trailing "No Finding" label (for SPML images without a finding)."""
        if NO_FINDING in self.names:
            return self
        return LabelSpace(f"{self.name}+nf", self.names + (NO_FINDING,))

    def to_json(self) -> dict:
        return {"name": self.name, "names": list(self.names)}

    @classmethod
    def from_json(cls, data: dict) -> "LabelSpace":
        return cls(data["name"], tuple(data["names"]))


NIH14 = LabelSpace(
    "nih14",
    (
        "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
        "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
    ),
)

# The 14 CheXpert observations in the column order of CheXpert's train.csv.
CHEXPERT14 = LabelSpace(
    "chexpert14",
    (
        "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
        "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
        "Fracture", "Support Devices",
    ),
)

# The five labels of the CheXpert competition (official validation protocol).
CHEXPERT5 = CHEXPERT14.subset(
    ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"), name="chexpert5"
)

# MIMIC-CXR-JPG's CheXpert/NegBio labeller columns, in the file's (alphabetical) order.
MIMIC14 = LabelSpace(
    "mimic14",
    (
        "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
        "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
        "Pneumothorax", "Support Devices",
    ),
)

LABEL_SPACES = {space.name: space for space in (NIH14, CHEXPERT14, CHEXPERT5, MIMIC14)}

# NIH name -> CheXpert/MIMIC name. Mass and Nodule both become "Lung Lesion"; Pleural_Thickening is
# an instance of "Pleural Other". Emphysema, Fibrosis and Hernia have no CheXpert counterpart, and
# Infiltration is deliberately not mapped to "Lung Opacity": the latter is broader.
NIH_TO_CHEXPERT = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Effusion": "Pleural Effusion",
    "Mass": "Lung Lesion",
    "Nodule": "Lung Lesion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Pleural_Thickening": "Pleural Other",
    NO_FINDING: NO_FINDING,
}


def label_space(name: str) -> LabelSpace:
    if name not in LABEL_SPACES:
        raise unknown("label space", name, LABEL_SPACES)
    return LABEL_SPACES[name]


def parse_labels(spec: str | Sequence[str]) -> LabelSpace:
    """A label space from a registered name ("nih14") or an explicit list of label names."""
    if isinstance(spec, str):
        return label_space(spec)
    return LabelSpace("custom", tuple(spec))


def label_cooccurrence(targets, mask=None):
    """L×L matrix of P(label j | label i) over images where both are known; NaN rows for labels never
    positive. A label statistic used by losses (LCL), reports and plots alike."""
    t = np.asarray(targets, dtype=np.float64)
    known = np.ones(t.shape, dtype=bool) if mask is None else np.asarray(mask) > 0
    pos = ((t > 0.5) & known).astype(np.float64)
    both = pos.T @ pos
    given = pos.T @ known.astype(np.float64)  # images with i positive and j known
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(given > 0, both / np.where(given > 0, given, 1.0), np.nan)


def label_pairs(model_labels, source_labels) -> tuple[list[tuple[int, int, str]], dict, list[str]]:
    """``(pairs, mapped, unscored)``: ``pairs`` are (model output, source column, report name).

    Exact names first; else the NIH↔CheXpert mapping (NIH → CheXpert always; CheXpert → NIH only where
    one NIH label maps there, since "Lung Lesion" is Mass or Nodule). A "No Finding" output that
    single-positive training added is not scored against a source that lacks it.
    """
    source = list(source_labels)
    reverse: dict[str, list[str]] = {}
    for nih, chexpert in NIH_TO_CHEXPERT.items():
        reverse.setdefault(chexpert, []).append(nih)
    pairs, mapped, unscored = [], {}, []
    for i, name in enumerate(model_labels):
        if name in source:
            pairs.append((i, source.index(name), name))
            continue
        target = NIH_TO_CHEXPERT.get(name)
        if target is None and len(reverse.get(name, [])) == 1:
            target = reverse[name][0]
        if target is not None and target in source and target != name:
            shown = f"{name} → {target}"
            pairs.append((i, source.index(target), shown))
            mapped[shown] = f"model label {name!r} scored against source label {target!r}"
        elif name != NO_FINDING:
            unscored.append(name)
    return pairs, mapped, unscored
