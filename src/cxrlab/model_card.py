"""What inference must know of training, in one typed record: the ``ModelCard`` and its ``InputSpec``.

A checkpoint's ``checkpoint.json`` and an ONNX export's sidecar ``model.onnx.json`` both hold the card's
fields at their top level, written by :func:`card_to_json` and read by :func:`card_from_json` (this
module is the one codec; it imports neither torch nor the recipe classes, so the ONNX path stays
torch-free). A checkpoint written before the card existed (its JSON has the recipe but no ``input``)
and a version-1 sidecar (``image_size``/``resize`` at the top, thresholds on the temperature-scaled
scale) are read into the same card, here and nowhere else.

Thresholds are stored on the model's own probability scale ``sigmoid(logit)``; with a per-label
temperature ``T`` (from ``cxrlab calibrate``) every backend outputs ``sigmoid(logit / T)`` and decides at
:meth:`ModelCard.output_thresholds`, ``sigmoid(logit(t) / T)``: the same decisions (scaling is
monotonic per label).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .config import Resize
from .errors import CxrlabError, unknown

RESIZE_MODES = tuple(r.value for r in Resize)  # data.resize's choices (config.Resize, torch-free)
# How a file becomes pixels (cxrlab.data.preprocess): Pillow / pydicom, a JPEG decoded at a reduced DCT
# scale that keeps >= 2 source pixels per output pixel, then an antialiased fit. Renamed if that changes.
DECODERS = ("draft2",)
DEFAULT_MIN_POSITIVES = 10


@dataclass(frozen=True)
class InputSpec:
    """The input a model takes: ``size``×``size`` grey (``channels`` 1) uint8 images, fitted by ``resize``
    (pad: long side to size, centred on black; crop: short side, centre cut) from pixels decoded by
    ``decoder``, then / 255. ``mean``/``std`` (one per backbone) are applied inside the model and its
    ONNX graph: recorded here so a reader knows them, never applied again by preprocessing."""

    size: int
    resize: str = "pad"
    decoder: str = DECODERS[0]
    channels: int = 1
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self):
        if not isinstance(self.size, (int, np.integer)) or isinstance(self.size, bool) or self.size < 8:
            raise CxrlabError(f"input size must be an integer >= 8 pixels, got {self.size!r}")
        if self.resize not in RESIZE_MODES:
            raise unknown("resize mode", self.resize, RESIZE_MODES)
        if self.decoder not in DECODERS:
            raise unknown("image decoder", self.decoder, DECODERS)
        if self.channels != 1:
            raise CxrlabError(f"input channels must be 1 (grey images), got {self.channels!r}")


@dataclass(frozen=True)
class Training:
    """Where the model came from, and what scoring it on new data must repeat: the source's views and
    MIMIC labeller, the uncertain-label policy, the report's reliability floor."""

    recipe: str = ""
    source: str = ""
    epochs: int | None = None
    metrics: dict = field(default_factory=dict)
    views: object = None
    labeller: str = "chexpert"
    policy: str = "full"
    min_positives: int = DEFAULT_MIN_POSITIVES
    exclude_unreliable: bool = False
    date: str = ""  # UTC date (YYYY-MM-DD) the checkpoint was written; "" in cards from before it


@dataclass(frozen=True)
class ModelCard:
    labels: tuple[str, ...]
    input: InputSpec
    thresholds: tuple[float, ...] | None = None
    threshold_source: str = ""
    temperature: tuple[float, ...] | None = None
    backbones: tuple[str, ...] = ()
    head: str = ""
    training: Training = field(default_factory=Training)
    versions: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("thresholds", "temperature"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.labels):
                raise CxrlabError(f"model card: {len(values)} {name} for {len(self.labels)} labels")
        if not self.threshold_source:
            object.__setattr__(self, "threshold_source",
                               "fitted per label on the training run's validation part" if self.thresholds
                               is not None else "none fitted: 0.5 for every label")

    def replace(self, **changes) -> "ModelCard":
        return dataclasses.replace(self, **changes)

    def output_thresholds(self) -> np.ndarray:
        """The thresholds on the scale the backends output (temperature applied); 0.5 where none fitted."""
        base = self.thresholds if self.thresholds is not None else [0.5] * len(self.labels)
        return scaled_thresholds(base, self.temperature)


def check_card_fits(card: ModelCard, card_file, model_file, outputs: int | None = None,
                    input_size: int | None = None, labels=None) -> None:
    """Refuse a card (``card_file``: checkpoint.json or the ONNX sidecar) that does not describe its model
    (``model_file``): the model's output count, input size and label names (each where the model says;
    None: it does not), so that no label is reported with its neighbour's probability. One line per
    mismatch, naming both files."""
    where = f"{card_file} does not match {model_file}"
    if outputs is not None and int(outputs) != len(card.labels):
        raise CxrlabError(f"{where}: the model has {int(outputs)} outputs but the card lists {len(card.labels)} "
                          "labels; re-export the model, or restore the card written with it")
    if input_size is not None and int(input_size) != card.input.size:
        raise CxrlabError(f"{where}: the model takes {int(input_size)} px images but the card says "
                          f"{card.input.size} px; re-export the model, or restore the card written with it")
    if labels is not None and tuple(labels) != tuple(card.labels):
        differ = next((i for i, (a, b) in enumerate(zip(labels, card.labels)) if a != b), min(len(labels),
                                                                                           len(card.labels)))
        model_name = labels[differ] if differ < len(labels) else "(none)"
        card_name = card.labels[differ] if differ < len(card.labels) else "(none)"
        raise CxrlabError(f"{where}: label {differ + 1} is {model_name!r} in the model but {card_name!r} in the "
                          "card; re-export the model, or restore the card written with it")


# ------------------------------------------------------------------------------------------- codec

CARD_KEYS = ("labels", "thresholds", "threshold_source", "temperature", "input", "backbones", "head",
             "training", "versions")


def card_to_json(card: ModelCard) -> dict:
    """The card's fields as JSON values (merged into checkpoint.json and the ONNX sidecar)."""
    return {"labels": list(card.labels),
            "thresholds": None if card.thresholds is None else [float(t) for t in card.thresholds],
            "threshold_source": card.threshold_source,
            "temperature": None if card.temperature is None else [float(t) for t in card.temperature],
            "input": {**dataclasses.asdict(card.input), "mean": list(card.input.mean), "std": list(card.input.std)},
            "backbones": list(card.backbones), "head": card.head,
            "training": dataclasses.asdict(card.training), "versions": dict(card.versions)}


def card_from_json(data: dict, where) -> ModelCard:
    """The card in a checkpoint.json or sidecar dict ``data`` (``where`` names the file in errors)."""
    if not isinstance(data, dict) or "labels" not in data:
        raise CxrlabError(f"{where} lacks 'labels'")
    try:
        if "input" in data:
            return _card(data, InputSpec(**{**data["input"], "mean": tuple(data["input"].get("mean", ())),
                                            "std": tuple(data["input"].get("std", ()))}),
                         Training(**data.get("training") or {}))
        if "recipe" in data:  # a checkpoint from before the card: its recipe says the rest
            return _card_from_recipe(data)
        if "image_size" in data:  # a version-1 ONNX sidecar
            return _card_from_sidecar_v1(data)
    except CxrlabError as exc:
        raise CxrlabError(f"{where}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CxrlabError(f"{where}: the model card is malformed ({type(exc).__name__}: {exc})") from None
    raise CxrlabError(f"{where} lacks 'input' (and has no recipe to build it from)")


def _card(data: dict, spec: InputSpec, training: Training, **override) -> ModelCard:
    fields = dict(labels=tuple(data["labels"]), input=spec,
                  thresholds=_floats(data.get("thresholds")), threshold_source=_source(data.get("threshold_source")),
                  temperature=_floats(data.get("temperature")), backbones=tuple(data.get("backbones") or ()),
                  head=data.get("head") or "", training=training, versions=dict(data.get("versions") or {}))
    return ModelCard(**{**fields, **override})


def _card_from_recipe(data: dict) -> ModelCard:
    recipe = data["recipe"]
    d, m, e = recipe.get("data", {}), recipe.get("model", {}), recipe.get("eval", {})
    training = Training(recipe=recipe.get("name", ""), source=d.get("source", ""), epochs=data.get("epoch"),
                        metrics=_scalars(data.get("metrics")), views=d.get("views"),
                        labeller=d.get("labeller", "chexpert"), policy=d.get("policy", "full"),
                        min_positives=int(e.get("min_positives", DEFAULT_MIN_POSITIVES)),
                        exclude_unreliable=bool(e.get("exclude_unreliable", False)))
    entries = m.get("backbones") or [m.get("backbone", "")]
    backbones = tuple(b["name"] if isinstance(b, dict) else str(b) for b in entries)
    versions = {"torch": data["torch"]} if data.get("torch") else {}
    head = "ensemble" if data.get("kind") == "ensemble" else m.get("head", "linear")
    return _card(data, InputSpec(int(d["image_size"]), d.get("resize", "pad")), training,
                 backbones=backbones, head=head, versions=versions)


def _card_from_sidecar_v1(data: dict) -> ModelCard:
    """Version 1 stored the thresholds already scaled by the temperature the graph applies."""
    means = [n["mean"] for n in data.get("normalisation") or []]
    stds = [n["std"] for n in data.get("normalisation") or []]
    versions = {k.removesuffix("_version"): data[k] for k in ("cxrlab_version", "torch_version") if data.get(k)}
    card = _card(data, InputSpec(int(data["image_size"]), data["resize"], mean=tuple(means), std=tuple(stds)),
                 Training(), versions=versions)  # checks the lengths before they are combined
    if card.thresholds is None or card.temperature is None:
        return card
    return card.replace(thresholds=tuple(float(t) for t in unscaled_thresholds(card.thresholds, card.temperature)))


def _floats(values) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


def _source(source) -> str:
    if source is None or isinstance(source, str):
        return source or ""
    import json

    return json.dumps(source, sort_keys=True)


def _scalars(metrics) -> dict:
    """The numbers of a metrics row (the provenance keeps a summary, not curves)."""
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ----------------------------------------------------------------------------------- temperature

def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def scaled_thresholds(thresholds, temperature) -> np.ndarray:
    """Thresholds on the unscaled probability scale -> on ``sigmoid(logit / T)``'s (same decisions)."""
    if temperature is None:
        return np.asarray(thresholds, dtype=np.float64)
    return 1 / (1 + np.exp(-logit(thresholds) / np.asarray(temperature, dtype=np.float64)))


def unscaled_thresholds(thresholds, temperature) -> np.ndarray:
    """The inverse of :func:`scaled_thresholds`."""
    return 1 / (1 + np.exp(-logit(thresholds) * np.asarray(temperature, dtype=np.float64)))
