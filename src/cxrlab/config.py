"""Recipes: YAML files parsed into typed, validated config sections, with ``key=value`` overrides.

Unknown keys and values of the wrong type are errors that name the key and the closest valid one.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import CxrlabError, closest


@dataclass
class DataConfig:
    source: str = "synthetic:2000"       # KIND:LOCATION (see cxrlab.data.sources.parse_source)
    labels: Any = None                   # label space name or list of names; None = the source's own
    policy: Literal["full", "u_ones", "u_zeros", "u_ignore", "spml"] = "full"
    policy_per_label: dict = field(default_factory=dict)  # label -> u_ones|u_zeros|u_ignore
    spml_no_finding: Literal["keep", "drop"] = "keep"  # keep (positive = "No Finding") | drop
    add_no_finding: bool = False         # other policies: add a "No Finding" output (positive when no label is)
    views: Any = None                    # None (all) | frontal | lateral | [PA, AP, ...]
    image_size: int = 64
    resize: Literal["pad", "crop"] = "pad"  # pad (keep the whole image, black borders) | crop (centre)
    labeller: Literal["chexpert", "negbio"] = "chexpert"  # MIMIC only: which label file
    cache_dir: str | None = None         # where prepared caches are made (default: $CXRLAB_CACHE or ~/.cache/cxrlab)
    cache: str | None = None             # a cache folder from `cxrlab prepare --out DIR`: train from it (checked)
    split: Literal["official", "random", "cv"] = "random"  # cv: the folds of `cxrlab cv` / `compare --cv`
    folds_file: str | None = None        # a manifest from `cxrlab data split --out`: cv and compare use its folds
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    folds: int = 5
    repeats: int = 1
    seed: int = 0
    num_workers: int = 0


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    pretrained: Any = False              # False | True (timm hub/cache) | path to a weights file
    head: str = "linear"
    head_args: dict = field(default_factory=dict)
    drop_rate: float = 0.0
    # label text for heads that embed labels (``prototype``): see cxrlab.models.text, cxrlab.labels_text
    text_encoder: str = "hashed"         # hashed | random | wordllama | hf:<path-or-id>
    text_encoder_args: dict = field(default_factory=dict)
    label_descriptions: dict = field(default_factory=dict)  # label -> description | {description, synonyms}
    backbones: list = field(default_factory=list)  # several: [name | {name, pretrained, output_stride}]; [] = backbone
    output_stride: int | None = None     # 8 | 16 | 32 where the backbone supports it; None = its default


@dataclass
class RegimeConfig:
    name: str = "supervised"
    args: dict = field(default_factory=dict)


@dataclass
class AugmentConfig:
    weak: dict = field(default_factory=lambda: {"name": "weak"})
    strong: dict = field(default_factory=lambda: {"name": "strong"})


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = False               # sgd only


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    step_size: int = 10
    gamma: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 32
    grad_clip: float | None = None
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on GPU, off on CPU
    ema: float | None = None             # EMA decay of weights, e.g. 0.999
    select_on: Literal["macro_auc", "loss"] = "macro_auc"
    early_stop_patience: int | None = None
    seed: int = 0
    device: str = "auto"
    channels_last: bool = False          # NHWC model and batches (faster convolutions on GPU tensor cores)
    compile: bool | str = False          # torch.compile the model: true (inductor), a mode or a backend name
    deterministic: bool = False          # torch deterministic algorithms, no cudnn autotuning (slower on GPU)
    find_unused_parameters: bool = False  # DDP: set true when some parameters get no gradient in a step


@dataclass
class EvalConfig:
    threshold: Literal["f1", "youden"] = "f1"  # fitted on validation only
    bootstrap: int = 200                 # bootstrap resamples for test-set CIs (0 = none)
    ci: float = 0.95
    min_positives: int = 10              # a label with fewer test positives is flagged unreliable
    exclude_unreliable: bool = False     # leave flagged labels out of the macro averages


@dataclass
class Recipe:
    name: str = "recipe"
    cite: str = ""                       # the paper the recipe follows, and where it departs from it
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: dict = field(default_factory=lambda: {"bce": 1.0})  # term name -> weight | {weight, args...}
    regime: RegimeConfig = field(default_factory=RegimeConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


RECIPE_DIRS = [Path.cwd() / "recipes", Path(__file__).resolve().parents[2] / "recipes"]


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise CxrlabError(f"recipe file not found: {path}")
        return path
    for folder in RECIPE_DIRS:
        candidate = folder / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    names = list_recipes()
    hint = closest(name_or_path, names)
    raise CxrlabError(f"unknown recipe {name_or_path!r}" + (f"; did you mean {hint!r}?" if hint else "")
                      + f" (recipes: {', '.join(names)})")


def list_recipes() -> list[str]:
    return sorted({p.stem for folder in RECIPE_DIRS if folder.is_dir() for p in folder.glob("*.yaml")})


def load_recipe(name_or_path: str | None = None, overrides: list[str] | tuple = ()) -> Recipe:
    """A recipe from a file or name (or the defaults when None), with ``a.b=value`` overrides applied."""
    raw: dict = {}
    if name_or_path:
        path = find_recipe(name_or_path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise CxrlabError(f"recipe {path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise CxrlabError(f"recipe {path}: expected a mapping at the top level")
        raw.setdefault("name", path.stem)
    raw = _resolve_base(copy.deepcopy(raw), seen=(str(name_or_path),))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise CxrlabError(f"override {item!r} is not of the form key=value")
        _set_path(raw, key.strip(), yaml.safe_load(value))
    return from_dict(raw)


def _resolve_base(raw: dict, seen: tuple) -> dict:
    """A recipe may start from another with ``base: <recipe>``; its own keys override the base's."""
    base = raw.pop("base", None)
    if base is None:
        return raw
    if base in seen:
        raise CxrlabError(f"recipe base cycle: {' -> '.join(seen + (base,))}")
    parent = yaml.safe_load(find_recipe(base).read_text()) or {}
    parent.pop("name", None)
    return _merge(_resolve_base(parent, seen + (base,)), raw)


# sections a recipe replaces whole instead of merging into its base's: a loss, head or regime's
# arguments only make sense together (a new head must not inherit the old head's arguments)
_REPLACED = ("loss", "head_args", "args", "text_encoder_args")


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in _REPLACED:
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(raw: dict) -> Recipe:
    return _build(Recipe, raw, "")


def _set_path(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise CxrlabError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise CxrlabError(f"config {prefix or 'recipe'!r}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in fields:
            hint = closest(key, fields)
            raise CxrlabError(f"unknown config key {full!r}" + (f"; did you mean {prefix}{hint!r}?" if hint else "")
                              + f" (valid in {prefix.rstrip('.') or 'recipe'}: {', '.join(fields)})")
        kwargs[key] = _coerce(hints[key], value, full)
    return cls(**kwargs)


def _coerce(hint, value, key: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, key + ".")
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except CxrlabError as exc:
                errors.append(str(exc))
        raise CxrlabError(errors[0])
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            hint_name = closest(str(value), [str(c) for c in choices])
            raise CxrlabError(f"config key {key!r}: {value!r} is not one of {', '.join(map(str, choices))}"
                              + (f"; did you mean {hint_name!r}?" if hint_name else ""))
        return value
    target = origin or hint
    if target is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if target is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if target is bool and not isinstance(value, bool):
        raise CxrlabError(f"config key {key!r} expects true/false, got {value!r}")
    if target is int and isinstance(value, bool):
        raise CxrlabError(f"config key {key!r} expects an integer, got {value!r}")
    if not isinstance(value, target):
        raise CxrlabError(f"config key {key!r} expects {target.__name__}, got {type(value).__name__} {value!r}")
    return value
