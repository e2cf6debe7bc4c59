"""Plain-English text for every label: a name, synonyms and a short radiological description.

Text encoders (:mod:`cxrlab.models.text`) turn these into the label vectors the ``prototype`` head
projects to class prototypes (DWML, Jin et al., Comput. Biol. Med. 157 (2023) 106683). Bare names
carry little for a general encoder ("cardiomegaly" and "enlarged cardiomediastinum" share no word), so
each description says what the finding is and how it looks on a chest radiograph, in words that
related findings share (fluid, air space, pleura, heart, mediastinum...).

One table covers NIH-14, CheXpert-14 and MIMIC-14 (MIMIC's labels are CheXpert's); a recipe overrides
entries with ``model.label_descriptions`` (see :func:`label_texts`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import CxrlabError, unknown


@dataclass(frozen=True)
class LabelText:
    name: str
    synonyms: tuple[str, ...]
    description: str

    def text(self) -> str:
        """The one string a text encoder reads for this label."""
        words = self.name.replace("_", " ")
        out = f"{words}: {self.description}"
        if self.synonyms:
            out += f" Also called {', '.join(self.synonyms)}."
        return out

    def to_json(self) -> dict:
        return {"name": self.name, "synonyms": list(self.synonyms), "description": self.description}


def _t(name: str, synonyms: Sequence[str], description: str) -> LabelText:
    return LabelText(name, tuple(synonyms), description)


_TABLE = [
    # shared by NIH and CheXpert/MIMIC
    _t("Atelectasis", ["lung collapse", "volume loss"],
       "collapse of part of the lung with loss of volume, seen as a linear or wedge shaped opacity that "
       "pulls the fissures, diaphragm or mediastinum towards it."),
    _t("Cardiomegaly", ["enlarged heart", "cardiac enlargement"],
       "an enlarged heart: the cardiac silhouette, the central shadow of the heart, wider than half of "
       "the chest on a frontal film."),
    _t("Pneumonia", ["lung infection", "chest infection"],
       "infection of the lung that fills the air spaces with pus and fluid, seen as patchy or lobar "
       "consolidation, an air space opacity, often with air bronchograms."),
    _t("Pneumothorax", ["collapsed lung from air", "air in the pleural space"],
       "air in the pleural space between the lung and the chest wall, seen as a sharp visceral pleural "
       "line with no lung markings beyond it."),
    _t("Consolidation", ["air space consolidation", "air space opacity"],
       "air spaces of the lung filled with fluid, pus, blood or cells instead of air, a dense "
       "opacity with air bronchograms, as in pneumonia."),
    _t("Edema", ["pulmonary edema", "fluid overload", "lung congestion"],
       "fluid in the lung interstitium and air spaces, often from heart failure, seen as hazy opacity "
       "around both hila, septal lines and fluid in the fissures."),
    # NIH ChestX-ray14 only
    _t("Effusion", ["pleural effusion", "pleural fluid"],
       "fluid collecting in the pleural space around the lung, blunting the costophrenic angle with a "
       "meniscus along the chest wall."),
    _t("Infiltration", ["infiltrate", "pulmonary infiltrate"],
       "ill defined opacity in the lung from fluid, cells or infection in the air spaces or "
       "interstitium, a nonspecific lung opacity."),
    _t("Mass", ["lung mass", "pulmonary mass", "tumour"],
       "a rounded solid lesion in the lung larger than three centimetres, often a tumour."),
    _t("Nodule", ["lung nodule", "pulmonary nodule", "coin lesion"],
       "a small rounded solid lesion in the lung up to three centimetres, a small mass."),
    _t("Emphysema", ["chronic obstructive pulmonary disease", "hyperinflation"],
       "destruction of the lung air spaces with trapped air, seen as hyperinflated lucent lungs, "
       "flattened diaphragms and bullae."),
    _t("Fibrosis", ["pulmonary fibrosis", "lung scarring", "interstitial fibrosis"],
       "scarring of the lung interstitium, seen as coarse reticular lines, honeycombing and volume "
       "loss, mostly at the lung bases."),
    _t("Pleural_Thickening", ["pleural scarring", "pleural plaque"],
       "thickened pleura along the chest wall or apex, a pleural scar often left by old pleural "
       "inflammation, infection or effusion."),
    _t("Hernia", ["hiatus hernia", "diaphragmatic hernia"],
       "abdominal contents such as the stomach pushed up through the diaphragm into the chest, seen "
       "as a gas or fluid filled shape behind the heart."),
    # CheXpert / MIMIC only
    _t("No Finding", ["normal study", "normal chest"],
       "a normal chest radiograph with clear lungs, a normal heart and mediastinum and no abnormality."),
    _t("Enlarged Cardiomediastinum", ["widened mediastinum", "mediastinal widening"],
       "widening of the mediastinum and cardiac silhouette, the central shadow of the heart and great "
       "vessels larger than normal, as with an enlarged heart."),
    _t("Lung Opacity", ["pulmonary opacity", "air space disease"],
       "any area of the lung whiter than normal, an opacity from fluid, pus, cells or collapse filling "
       "the air spaces, including consolidation, edema and atelectasis."),
    _t("Lung Lesion", ["lung mass or nodule", "pulmonary lesion"],
       "a focal rounded solid lesion in the lung, a nodule or a mass."),
    _t("Pleural Effusion", ["effusion", "pleural fluid"],
       "fluid collecting in the pleural space around the lung, blunting the costophrenic angle with a "
       "meniscus along the chest wall."),
    _t("Pleural Other", ["pleural thickening", "pleural plaque", "pleural scarring"],
       "a pleural abnormality other than effusion, such as thickened pleura along the chest wall, "
       "pleural plaques or a pleural scar."),
    _t("Fracture", ["broken bone", "rib fracture"],
       "a break in a bone of the chest, most often a rib, clavicle or vertebra, seen as a lucent line "
       "or a step in the cortex."),
    _t("Support Devices", ["lines and tubes", "medical devices"],
       "man made medical devices such as endotracheal tubes, central venous catheters, pacemakers, "
       "drains and sternal wires."),
]

LABEL_TEXTS: dict[str, LabelText] = {entry.name: entry for entry in _TABLE}


def label_texts(names: Sequence[str], overrides: Mapping | None = None) -> list[LabelText]:
    """The text of each label in ``names`` (in that order), with a recipe's ``model.label_descriptions``
    applied. An override is a string (the description) or a mapping with ``description`` and/or
    ``synonyms``; it may also describe a label the table lacks (a custom label space)."""
    overrides = dict(overrides or {})
    for key in overrides:
        if key not in names:
            raise unknown("label in model.label_descriptions", key, names)
    out = []
    for name in names:
        base = LABEL_TEXTS.get(name)
        given = overrides.get(name)
        if given is None:
            if base is None:
                raise CxrlabError(f"no description for label {name!r}: add it to the recipe as "
                                  f"model.label_descriptions: {{{name!r}: 'what it is and how it looks'}}")
            out.append(base)
            continue
        if isinstance(given, str):
            given = {"description": given}
        if not isinstance(given, Mapping):
            raise CxrlabError(f"model.label_descriptions.{name}: expected a string or a mapping with "
                              f"description/synonyms, got {given!r}")
        for key in given:
            if key not in ("description", "synonyms"):
                raise unknown(f"key in model.label_descriptions.{name}", key, ["description", "synonyms"])
        description = given.get("description", base.description if base else None)
        if not isinstance(description, str) or not description.strip():
            raise CxrlabError(f"model.label_descriptions.{name}: the description must be a non-empty string")
        synonyms = given.get("synonyms", base.synonyms if base else ())
        if isinstance(synonyms, str) or not all(isinstance(s, str) for s in synonyms):
            raise CxrlabError(f"model.label_descriptions.{name}.synonyms: expected a list of strings, "
                              f"got {synonyms!r}")
        out.append(LabelText(name, tuple(synonyms), description.strip()))
    return out
