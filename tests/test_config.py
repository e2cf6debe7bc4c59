"""Recipes: every shipped recipe builds; bad keys, types and values are errors that name them."""
import inspect

import numpy as np
import pytest

from cxrlab.config import list_recipes, load_recipe
from cxrlab.data.transforms import parse_spec
from cxrlab.errors import CxrlabError
from cxrlab.losses.base import LossContext, Objective
from cxrlab.registry import HEADS, REGIMES


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_builds_its_parts(name):
    from cxrlab.workflows.experiment import check_contracts

    recipe = load_recipe(name)
    check_contracts(recipe)  # head, regime and loss terms fit together
    head = HEADS.get(recipe.model.head)
    accepted = set(inspect.signature(head).parameters)
    assert set(recipe.model.head_args) <= accepted, f"{name}: head_args not accepted by {recipe.model.head}"
    labels = tuple(f"l{i}" for i in range(14))
    # the label space a recipe trains on: a "No Finding" output is added by add_no_finding or by spml
    labels += ("No Finding",) if recipe.data.add_no_finding or recipe.data.policy == "spml" else ("l14",)
    target = (np.random.default_rng(0).random((40, 15)) < 0.3).astype(np.float32)
    Objective(recipe.loss, LossContext.from_targets(labels, target, np.ones_like(target)))
    regime = REGIMES.get(recipe.regime.name)
    args = dict(recipe.regime.args)
    if "feature_dim" in inspect.signature(regime).parameters:
        args.setdefault("feature_dim", 512)
    regime(lambda x: x, lambda x: x, **args)
    parse_spec(recipe.augment.weak)
    parse_spec(recipe.augment.strong)
    assert recipe.data.source.split(":", 1)[0] in {"nih", "chexpert", "mimic", "synthetic", "csv", "folder"}


def test_paper_recipes_follow_their_protocols():
    lcl = load_recipe("lcl_chexpert")
    assert (lcl.data.policy, lcl.data.image_size, lcl.data.split, lcl.data.repeats, lcl.data.folds) == \
        ("u_ones", 224, "cv", 3, 5)
    assert lcl.model.head == "lcl" and set(lcl.loss) == {"lcl_branches", "lcl_consistency", "lcl_supcon"}
    baseline = load_recipe("lcl_chexpert_bce")
    assert baseline.model.head == "linear" and baseline.model.head_args == {}  # head args are not inherited
    assert (baseline.data, baseline.optim, baseline.train) == (lcl.data, lcl.optim, lcl.train)
    mpc = load_recipe("mpc_chexpert")
    assert mpc.data.policy == "spml" and mpc.regime.name == "mpc"
    assert set(mpc.loss) == {"spml_observed", "mpc_ipc", "mpc_fpc", "mpc_btc"}
    ablation = load_recipe("mpc_synthetic_ipc")
    assert ablation.regime.args["fpc"] is False and ablation.regime.args["btc"] is False
    assert parse_spec(ablation.augment.strong)["elastic"] == 0.0
    assert parse_spec(load_recipe("mpc_synthetic_red").augment.strong)["elastic"] > 0


def test_overrides_are_typed():
    recipe = load_recipe("demo", ["train.epochs=2", "optim.lr=0.01", "model.backbone=resnet50",
                                  "data.views=[PA, AP]", "train.ema=null"])
    assert recipe.train.epochs == 2 and recipe.optim.lr == 0.01 and recipe.model.backbone == "resnet50"
    assert recipe.data.views == ["PA", "AP"] and recipe.train.ema is None


@pytest.mark.parametrize("override, words", [
    (["train.epoch=3"], ["train.epoch", "did you mean", "epochs"]),
    (["modle.backbone=x"], ["modle", "model"]),
    (["train.epochs=three"], ["train.epochs", "int"]),
    (["train.channels_last=maybe"], ["train.channels_last", "true/false"]),
    (["optim.lr=fast"], ["optim.lr", "float"]),
    (["train.epochs"], ["train.epochs", "key=value"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(CxrlabError) as exc:
        load_recipe("demo", override)
    for word in words:
        assert word in str(exc.value)


def test_unknown_recipe_and_bad_files(tmp_path):
    with pytest.raises(CxrlabError, match="lcl_chexpert"):
        load_recipe("lcl_chexprt")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {source: [unclosed\n")
    with pytest.raises(CxrlabError, match="bad.yaml"):
        load_recipe(str(bad))
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(CxrlabError, match="cycle"):
        load_recipe(str(loop))


def test_unknown_loss_and_loss_argument_are_named():
    ctx = LossContext.from_targets(("a", "b"), np.eye(2, dtype=np.float32), np.ones((2, 2), np.float32))
    with pytest.raises(CxrlabError, match="focal"):
        Objective({"focall": 1.0}, ctx)
    with pytest.raises(CxrlabError, match="gama"):
        Objective({"focal": {"weight": 1.0, "gama": 2}}, ctx)


@pytest.mark.parametrize("override, words", [
    ("model.backbone=resnet19", ["resnet19", "resnet18"]),
    ("model.head=lcll", ["lcll", "lcl"]),
    ("model.head_args.dimm=3", ["dimm", "dim"]),
    ("loss.focal.gama=2", ["gama", "gamma"]),
    ("regime.args.tau=0.9", ["tau", "mpc"]),
    ("augment.strong.elastik=0.5", ["elastik", "elastic"]),
])
def test_misspelt_parts_fail_before_any_data_is_read(override, words, tmp_path):
    from cxrlab.workflows.experiment import run

    base = ["loss.focal.weight=1.0"] if override.startswith("loss.focal") else []
    regime = ["regime.name=mpc"] if override.startswith("regime") else []
    # the source does not exist: the error must come from the recipe check, not from the data
    recipe = load_recipe("demo", ["data.source=nih:/nonexistent", *base, *regime, override])
    with pytest.raises(CxrlabError) as exc:
        run(recipe, tmp_path)
    for word in words:
        assert word in str(exc.value)


# ------------------------------------------------------------------------------ one enum per choice

def _choice_fields():
    """``(section.key, enum)`` for every string choice of the config."""
    import dataclasses
    import typing
    from enum import StrEnum

    from cxrlab.config import Recipe

    out = []
    for section in dataclasses.fields(Recipe):
        cls = typing.get_type_hints(Recipe)[section.name]
        if not dataclasses.is_dataclass(cls):
            continue
        for key, hint in typing.get_type_hints(cls).items():
            assert typing.get_origin(hint) is not typing.Literal, f"{section.name}.{key} is a Literal: make it a StrEnum"
            if isinstance(hint, type) and issubclass(hint, StrEnum):
                out.append((f"{section.name}.{key}", hint))
    return out


def test_choices_are_enums_loaded_from_plain_strings_and_written_as_plain_strings():
    import json

    from cxrlab.config import Amp, Resize, from_dict

    fields = dict(_choice_fields())
    assert {"data.policy", "data.resize", "optim.name", "schedule.name", "train.amp", "eval.threshold"} <= set(fields)
    recipe = load_recipe("demo", ["data.resize=crop", "train.amp=off"])
    assert recipe.data.resize is Resize.CROP and recipe.train.amp is Amp.OFF
    for key, enum in fields.items():
        section, name = key.split(".")
        assert isinstance(getattr(getattr(recipe, section), name), enum), key
    plain = recipe.to_dict()
    for key in fields:
        section, name = key.split(".")
        assert type(plain[section][name]) is str, key  # checkpoint.json holds plain strings
    text = json.dumps(plain)
    assert '"resize": "crop"' in text and '"amp": "off"' in text
    assert from_dict(json.loads(text)) == recipe  # an old checkpoint's recipe (plain strings) loads


@pytest.mark.parametrize("override, hint", [
    ("data.resize=crp", "crop"), ("data.policy=u_one", "u_ones"), ("data.split=oficial", "official"),
    ("optim.name=adam_w", "adamw"), ("schedule.name=cosin", "cosine"), ("train.amp=bf61", "bf16"),
    ("train.select_on=los", "loss"), ("eval.threshold=youdn", "youden"), ("data.labeller=negbi", "negbio"),
])
def test_a_bad_choice_names_the_key_and_the_closest_value(override, hint):
    key = override.split("=")[0]
    with pytest.raises(CxrlabError, match=rf"config key '{key}': .* is not one of .*; did you mean '{hint}'\?$"):
        load_recipe("demo", [override])


def test_no_module_restates_a_choice_list():
    """A tuple or list of exactly one choice enum's values, written out in the package, is a second copy."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "cxrlab"
    lists = {frozenset(e) for _, e in _choice_fields()}
    found = []
    for path in sorted(src.rglob("*.py")):
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List)) and node.elts and all(
                    isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                if frozenset(e.value for e in node.elts) in lists:
                    found.append(f"{path.relative_to(src)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)
