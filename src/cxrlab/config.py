"""Recipes: YAML files parsed into typed, validated config sections, with ``key=value`` overrides.

Unknown keys and values of the wrong type are errors that name the key and the closest valid one.
Every string choice is one ``StrEnum`` below, which the code compares with too: a member equals its
plain string, YAML gives plain strings, and ``Recipe.to_dict`` (checkpoint.json) writes plain strings.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import CxrlabError, closest


class Policy(StrEnum):  # data.policy; see cxrlab.data.policies
    FULL = "full"
    U_ONES = "u_ones"
    U_ZEROS = "u_zeros"
    U_IGNORE = "u_ignore"
    SPML = "spml"


class NoFinding(StrEnum):  # data.spml_no_finding
    KEEP = "keep"
    DROP = "drop"


class Resize(StrEnum):  # data.resize
    PAD = "pad"    # keep the whole image, black borders
    CROP = "crop"  # centre crop


class Labeller(StrEnum):  # data.labeller (MIMIC)
    CHEXPERT = "chexpert"
    NEGBIO = "negbio"


class Split(StrEnum):  # data.split
    OFFICIAL = "official"
    RANDOM = "random"
    CV = "cv"


class Duplicates(StrEnum):  # data.duplicates (csv sources)
    WARN = "warn"
    DROP = "drop"


class Optimizer(StrEnum):  # optim.name
    ADAMW = "adamw"
    ADAM = "adam"
    SGD = "sgd"


class Schedule(StrEnum):  # schedule.name
    COSINE = "cosine"
    STEP = "step"
    CONSTANT = "constant"


class Amp(StrEnum):  # train.amp
    AUTO = "auto"  # bf16 on GPU, off on CPU
    BF16 = "bf16"
    FP16 = "fp16"
    OFF = "off"


class SelectOn(StrEnum):  # train.select_on
    MACRO_AUC = "macro_auc"
    LOSS = "loss"


class ThresholdRule(StrEnum):  # eval.threshold; see cxrlab.metrics.thresholds
    F1 = "f1"
    YOUDEN = "youden"


class Level(StrEnum):  # eval.level; see cxrlab.metrics.study
    AUTO = "auto"    # both where some study of the data holds several images (CheXpert, MIMIC), else image
    IMAGE = "image"
    BOTH = "both"    # every image, and every study (its images' probabilities aggregated)


class StudyAggregation(StrEnum):  # eval.study_aggregation
    MAX = "max"
    MEAN = "mean"


def choose(choices: type[StrEnum], value, what: str) -> StrEnum:
    """``value`` as a member of ``choices``, or the one-line error naming ``what``, the closest valid
    value and all of them (default first): for library functions and hand-built config sections, which
    may hold plain strings that no recipe load checked."""
    try:
        return choices(value)
    except ValueError:
        values = [c.value for c in choices]
        hint = closest(str(value), values)
        raise CxrlabError(f"unknown {what} {str(value)!r}" + (f"; did you mean {hint!r}?" if hint else "")
                          + f" (valid: {', '.join(values)})") from None


@dataclass
class DataConfig:
    source: str = "synthetic:2000"       # KIND:LOCATION (see cxrlab.data.sources.parse_source)
    labels: Any = None                   # label space name or list of names; None = the source's own
    policy: Policy = Policy.FULL
    policy_per_label: dict = field(default_factory=dict)  # label -> u_ones|u_zeros|u_ignore
    spml_no_finding: NoFinding = NoFinding.KEEP  # keep (positive = "No Finding") | drop
    add_no_finding: bool = False         # other policies: add a "No Finding" output (positive when no label is)
    views: Any = None                    # None (all) | frontal | lateral | [PA, AP, ...]
    image_size: int = 64
    resize: Resize = Resize.PAD  # pad (keep the whole image, black borders) | crop (centre)
    labeller: Labeller = Labeller.CHEXPERT  # MIMIC only: which label file
    cache_dir: str | None = None         # where prepared caches are made (default: $CXRLAB_CACHE or ~/.cache/cxrlab)
    cache: str | None = None             # a cache folder from `cxrlab prepare --out DIR`: train from it (checked)
    split: Split = Split.RANDOM  # cv: the folds of `cxrlab cv` / `compare --cv`
    folds_file: str | None = None        # a manifest from `cxrlab data split --out`: cv and compare use its folds
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    folds: int = 5
    repeats: int = 1
    seed: int = 0
    num_workers: int = 0
    duplicates: Duplicates = Duplicates.WARN  # csv: exact duplicate rows counted in a warning, or dropped


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
    # parts kept fixed (out of the optimiser; their BatchNorm statistics too): "backbone" or parameter-name
    # prefixes such as [backbone.net.conv1, backbone.net.layer1]; [] = train everything
    freeze: Any = field(default_factory=list)
    # start from a checkpoint's weights: a folder (all weights, strict), or {path, parts: [backbone, ...]}
    # (only those parts, strict within them); "{fold}" in the path is the cv/compare fold, e.g. r0f1
    init_from: Any = None


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
    name: Optimizer = Optimizer.ADAMW
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = False               # sgd only
    # learning rate of each part = lr × its multiplier (engine/optim.py); new parts often need another rate
    backbone_lr_mult: float = 1.0
    head_lr_mult: float = 1.0
    regime_lr_mult: float = 1.0          # the regime's own modules (e.g. MPC's batch transformer)
    new_params_warmup_epochs: float = 0.0  # linear warm-up of the head's and regime's rates, on top of the schedule


@dataclass
class ScheduleConfig:
    name: Schedule = Schedule.COSINE
    warmup_epochs: float = 0.0
    step_size: int = 10
    gamma: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 32
    grad_clip: float | None = None
    amp: Amp = Amp.AUTO  # auto: bf16 on GPU, off on CPU
    ema: float | None = None             # EMA decay of weights, e.g. 0.999
    select_on: SelectOn = SelectOn.MACRO_AUC
    early_stop_patience: int | None = None
    seed: int = 0
    device: str = "auto"
    channels_last: bool = False          # NHWC model and batches (faster convolutions on GPU tensor cores)
    compile: bool | str = False          # torch.compile the model: true (inductor), a mode or a backend name
    deterministic: bool = False          # torch deterministic algorithms, no cudnn autotuning (slower on GPU)
    find_unused_parameters: bool = False  # DDP: set true when some parameters get no gradient in a step
    # where each epoch's numbers go (engine/run_log.py): csv (log.csv), tensorboard (when installed), mlflow
    loggers: list = field(default_factory=lambda: ["csv", "tensorboard"])
    mlflow: dict = field(default_factory=dict)  # {tracking_uri, experiment, run_name}; unset: MLflow's env vars


SUBGROUP_ATTRIBUTES = ("sex", "age_band", "view")  # what eval.subgroups may name (metrics/subgroups.py)


@dataclass
class EvalConfig:
    threshold: ThresholdRule = ThresholdRule.F1  # fitted on validation only
    bootstrap: int = 200                 # bootstrap resamples for test-set CIs (0 = none)
    ci: float = 0.95
    min_positives: int = 10              # a label with fewer test positives is flagged unreliable
    exclude_unreliable: bool = False     # leave flagged labels out of the macro averages
    # test metrics by subgroup (those the source lacks are skipped); age bands start at these ages
    subgroups: list = field(default_factory=lambda: list(SUBGROUP_ATTRIBUTES))
    age_bands: list = field(default_factory=lambda: [40, 60, 80])
    level: Level = Level.AUTO            # image | both (image and study level) | auto
    study_aggregation: StudyAggregation = StudyAggregation.MAX  # a study's probability: max | mean of its images

    def __post_init__(self):
        for name in self.subgroups:
            if name not in SUBGROUP_ATTRIBUTES:
                hint = closest(str(name), SUBGROUP_ATTRIBUTES)
                raise CxrlabError(f"config key 'eval.subgroups': {name!r} is not one of "
                                  f"{', '.join(SUBGROUP_ATTRIBUTES)}" + (f"; did you mean {hint!r}?" if hint else ""))
        edges = self.age_bands
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in edges) or edges != sorted(set(edges)):
            raise CxrlabError(f"config key 'eval.age_bands': expected increasing ages, e.g. [40, 60, 80]; got {edges!r}")


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
        """Plain values only (choices as their strings): what checkpoint.json and reports hold."""
        return dataclasses.asdict(self, dict_factory=lambda pairs: {k: v.value if isinstance(v, Enum) else v
                                                                    for k, v in pairs})


# the recipes shipped as package data (a wheel holds them; a plain file system path once installed)
BUILTIN_RECIPES = Path(str(resources.files("cxrlab.recipes")))


def recipe_dirs() -> list[Path]:
    """Where recipe names are looked up, first match wins: ``recipes/`` of the current folder (now), the
    folders of ``$CXRLAB_RECIPES`` (``dir1:dir2``), then the built-in ones."""
    extra = [Path(p).expanduser() for p in os.environ.get("CXRLAB_RECIPES", "").split(os.pathsep) if p]
    missing = [str(p) for p in extra if not p.is_dir()]
    if missing:
        raise CxrlabError(f"CXRLAB_RECIPES: no such folder: {', '.join(missing)}")
    return [Path.cwd() / "recipes", *extra, BUILTIN_RECIPES]


def find_recipe(name_or_path: str, quiet: bool = False) -> Path:
    """The YAML file of a recipe name or path; one that replaces a built-in recipe says so on stderr
    (unless ``quiet``: ``list recipes`` shows it in its table instead)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise CxrlabError(f"recipe file not found: {path}")
        return path
    for folder in recipe_dirs():
        candidate = folder / f"{name_or_path}.yaml"
        if candidate.is_file():
            builtin = BUILTIN_RECIPES / candidate.name
            if not quiet and builtin.is_file() and builtin.resolve() != candidate.resolve():
                # a stray recipes/NAME.yaml (or one on $CXRLAB_RECIPES) must not change an experiment unnoticed
                print(f"cxrlab: note: recipe {name_or_path!r} is {candidate}, which replaces the built-in "
                      f"{builtin}", file=sys.stderr)
            return candidate
    names = list_recipes()
    hint = closest(name_or_path, names)
    raise CxrlabError(f"unknown recipe {name_or_path!r}" + (f"; did you mean {hint!r}?" if hint else "")
                      + f" (recipes: {', '.join(names)})")


def list_recipes() -> list[str]:
    return sorted({p.stem for folder in recipe_dirs() if folder.is_dir() for p in folder.glob("*.yaml")})


def load_recipe(name_or_path: str | None = None, overrides: list[str] | tuple = ()) -> Recipe:
    """A recipe from a file or name (or the defaults when None), with ``a.b=value`` overrides applied."""
    raw: dict = {}
    if name_or_path:
        path = find_recipe(name_or_path)
        raw = _read_recipe_file(path, f"recipe {path}")
        raw.setdefault("name", path.stem)
    raw = _resolve_base(copy.deepcopy(raw), seen=(str(name_or_path),))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CxrlabError(f"override {item!r} is not of the form key=value (e.g. train.epochs=3)")
        try:
            parsed = _parse_yaml(value)
        except yaml.YAMLError as exc:  # also a tag such as !!python/object: the safe loader builds no objects
            shown = item if len(item) <= 80 else f"{item[:60]}... ({len(item)} characters)"
            raise CxrlabError(f"override {shown!r}: the value is not valid YAML ({_yaml_reason(exc)})") from None
        _set_path(raw, key.strip(), parsed)
    recipe = from_dict(raw)
    # for the run header; an attribute, not a field, so config.json and the run-reuse checks do not see it
    recipe.origin = recipe_origin(path if name_or_path else None, overrides)
    return recipe


def recipe_origin(path: Path | None, overrides=()) -> str:
    """``built-in demo.yaml + train.epochs=1``, ``recipes/mine.yaml``: where a recipe was read from."""
    if path is None:
        where = "the defaults"
    elif path.resolve().parent == BUILTIN_RECIPES.resolve():
        where = f"built-in {path.name}"
    else:
        where = str(path)
    return where + "".join(f" + {item}" for item in overrides)


def _read_recipe_file(path: Path, where: str) -> dict:
    """A recipe file's YAML mapping (safe loader: no tag builds an object), errors naming ``where``."""
    try:
        raw = _parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CxrlabError(f"{where}: not valid YAML: {_yaml_reason(exc)}") from None
    if not isinstance(raw, dict):
        raise CxrlabError(f"{where}: expected a mapping at the top level")
    return raw


class _RecipeLoader(yaml.SafeLoader):
    """The safe loader (no tag builds an object) without aliases: a recipe never needs ``*name``, and a
    few nested aliases (an "alias bomb" of 1 KB) expand to billions of values when the recipe is merged,
    copied or printed."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"YAML alias *{event.anchor} is not allowed in "
                                              "recipes (write the value out)", event.start_mark)
        return super().compose_node(parent, index)


def _parse_yaml(text: str):
    """A recipe's or an override's YAML; a number too long to convert (a 5,000-digit integer) is a YAML
    error like any other rather than Python's ValueError."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except ValueError as exc:
        if "digits" not in str(exc):
            raise
        raise yaml.YAMLError(f"a number longer than {sys.get_int_max_str_digits()} digits") from None


def _yaml_reason(exc: yaml.YAMLError) -> str:
    """The first line of a YAML error (its problem, and where), without the quoted source lines."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem:
        return problem + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark else "")
    return str(exc).splitlines()[0]


def _resolve_base(raw: dict, seen: tuple) -> dict:
    """A recipe may start from another with ``base: <recipe>``; its own keys override the base's."""
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base.strip():
        raise CxrlabError(f"recipe {seen[-1]}: 'base' must name one recipe or YAML file (e.g. base: nih_base), "
                          f"got {type(base).__name__} {base!r}")
    if base in seen:
        raise CxrlabError(f"recipe base cycle: {' -> '.join(seen + (base,))}")
    path = find_recipe(base)
    parent = _read_recipe_file(path, f"recipe {path} (base of {seen[-1]})")
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
    recipe = _build(Recipe, raw, "")
    validate(recipe)
    return recipe


# (section.key, test, what it must be): values a type check lets through but no run can use
_RANGES = [
    ("train.epochs", lambda v: v >= 1, "an integer >= 1"),
    ("train.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("train.grad_clip", lambda v: v is None or v > 0, "> 0 or null"),
    ("train.ema", lambda v: v is None or 0 < v < 1, "between 0 and 1 (exclusive) or null"),
    ("train.early_stop_patience", lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    ("data.image_size", lambda v: v >= 8, "an integer >= 8 (pixels)"),
    ("data.val_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("data.test_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("data.folds", lambda v: v >= 2, "an integer >= 2"),
    ("data.repeats", lambda v: v >= 1, "an integer >= 1"),
    ("data.num_workers", lambda v: v >= 0, "an integer >= 0"),
    ("optim.lr", lambda v: v > 0, "> 0"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.backbone_lr_mult", lambda v: v >= 0, ">= 0"),
    ("optim.head_lr_mult", lambda v: v >= 0, ">= 0"),
    ("optim.regime_lr_mult", lambda v: v >= 0, ">= 0"),
    ("optim.new_params_warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("schedule.warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("schedule.step_size", lambda v: v >= 1, "an integer >= 1"),
    ("eval.bootstrap", lambda v: v >= 0, "an integer >= 0"),
    ("eval.ci", lambda v: 0 < v < 1, "between 0 and 1 (exclusive)"),
]


def validate(recipe: Recipe) -> None:
    """Range checks at load time, so a bad value fails before any data is prepared, naming the key."""
    for key, ok, what in _RANGES:
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        if not ok(value):
            raise CxrlabError(f"config key {key!r} must be {what}, got {value!r}")
    d = recipe.data
    if d.val_fraction + d.test_fraction >= 1:
        raise CxrlabError(f"data.val_fraction + data.test_fraction must be < 1 (no training images left), got "
                          f"{d.val_fraction} + {d.test_fraction}")


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
            raise CxrlabError(f"unknown config key {full!r}" + (f"; did you mean {prefix + hint!r}?" if hint else "")
                              + f" (valid in {prefix.rstrip('.') or 'recipe'}: {', '.join(fields)})")
        kwargs[key] = _coerce(hints[key], value, full)
    return cls(**kwargs)


_INT_LIMIT = 2**63 - 1


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
    is_choice = isinstance(hint, type) and issubclass(hint, StrEnum)
    if is_choice or origin is Literal:
        choices = [c.value for c in hint] if is_choice else list(typing.get_args(hint))
        if value is False and "off" in choices:  # YAML 1.1 reads a bare `off` (train.amp=off) as false
            value = "off"
        if value not in choices:
            hint_name = closest(str(value), [str(c) for c in choices])
            raise CxrlabError(f"config key {key!r}: {value!r} is not one of {', '.join(map(str, choices))}"
                              + (f"; did you mean {hint_name!r}?" if hint_name else ""))
        return hint(value) if is_choice else value
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
    if target is int and isinstance(value, int) and abs(value) > _INT_LIMIT:  # what torch and numpy can hold
        raise CxrlabError(f"config key {key!r}: {value:.3g} is out of range (at most {_INT_LIMIT} in size)")
    if not isinstance(value, target):
        raise CxrlabError(f"config key {key!r} expects {target.__name__}, got {type(value).__name__} {value!r}")
    return value
