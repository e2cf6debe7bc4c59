"""Parts declare what they provide and require; a recipe whose parts do not fit is refused at load.

Heads declare the extras they fill (``provides`` / ``extras_for``) and their capabilities; loss terms and
regimes declare the extras they read (``requires``) and regimes whether they need one feature map.
These tests keep the declarations honest (every head is built and its Output compared with what it
declares) and check that ``check_parts`` refuses a mismatch before any data is read.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrlab.config import from_dict, load_recipe
from cxrlab.errors import CxrlabError
from cxrlab.models import build_model
from cxrlab.models.heads.base import Capability, Head
from cxrlab.registry import HEADS, LOSSES, REGIMES
from cxrlab.regimes.base import Regime
from cxrlab.workflows.experiment import check_contracts, check_parts

SRC = Path(__file__).resolve().parents[1] / "src" / "cxrlab"
LABELS = 3


def small_args(head_cls) -> dict:
    """Small sizes for the heads that take them (a fast forward on the CPU)."""
    params = inspect.signature(head_cls).parameters
    return {k: v for k, v in {"dim": 16, "hidden": 16, "num_heads": 4}.items() if k in params}


def built_head(name: str, head_args: dict | None = None):
    """A model with head ``name`` on test_resnet backbone(s), its hooks fed as the pipeline feeds them."""
    head_cls = HEADS.get(name)
    args = {**small_args(head_cls), **(head_args or {})}
    backbone = ["test_resnet", "test_resnet"] if head_cls.takes_several_maps() else "test_resnet"
    torch.manual_seed(0)
    model = build_model(backbone, name, LABELS, head_args=args)
    model.head.set_cooccurrence(np.full((LABELS, LABELS), 0.5) + 0.5 * np.eye(LABELS))
    if Capability.LABEL_TEXT in model.head.capabilities:
        model.head.set_label_text(np.random.default_rng(0).normal(size=(LABELS, 8)))
    return model, args


def recipe_with(head: str, regime: str = "supervised", loss: str = "bce", head_args=None, regime_args=None):
    several = HEADS.get(head).takes_several_maps()
    model = {"head": head, "head_args": head_args or {},
             **({"backbones": ["test_resnet", "test_resnet"]} if several else {"backbone": "test_resnet"})}
    return from_dict({"model": model, "regime": {"name": regime, "args": regime_args or {}}, "loss": {loss: 1.0}})


def fits(head: str, regime: str, loss: str) -> bool:
    try:
        check_contracts(recipe_with(head, regime, loss))
    except CxrlabError:
        return False
    return True


# ------------------------------------------------------------------------ refused at load, before any data

def test_dwml_on_a_linear_head_is_refused_before_any_data_is_read(tmp_path, capsys):
    from cxrlab.cli import main

    cache = tmp_path / "cache"
    rc = main(["train", "demo", "loss={dwml: 1.0}", f"data.cache_dir={cache}", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err == ("cxrlab: error: loss 'dwml' needs extras similarity, which head 'linear' does not provide; "
                   "heads that do: prototype")
    assert not cache.exists()


def test_the_cache_folder_is_where_preparing_would_write(tmp_path):
    """The control of the test above: with this cache_dir, preparing data does create the folder (so its
    absence there means that nothing was read)."""
    from cxrlab.data.prepared import prepare_data

    cache = tmp_path / "cache"
    prepare_data(load_recipe("demo", ["data.source=synthetic:24", "data.image_size=32", f"data.cache_dir={cache}"]),
                 progress=False)
    assert cache.is_dir() and any(cache.iterdir())


@pytest.mark.parametrize("overrides, message", [
    (["model.head=cross_attention", "model.backbones=[test_resnet, test_resnet]",
      "model.head_args={auxiliary: false}", "loss={can_attention: 1.0}"],
     "loss 'can_attention' needs extras cross_logits, which head 'cross_attention' with head_args "
     "{'auxiliary': False} does not provide; heads that do: cross_attention"),
    (["loss={mpc_ipc: 1.0}"],
     "loss 'mpc_ipc' needs extras pseudo_mask, pseudo_target, strong_logits, which regime 'supervised' does not "
     "provide; regimes that do: mpc"),
    (["regime.name=mpc", "regime.args={fpc: false}", "loss={mpc_fpc: 1.0}"],
     "loss 'mpc_fpc' needs extras fpc_logits, which regime 'mpc' does not provide with regime.args {'fpc': False}; "
     "regimes that do: mpc"),
    (["regime.name=mpc", "model.head=concat", "model.backbones=[test_resnet, test_resnet]"],
     "regime 'mpc' works on one backbone's feature map, which head 'concat' does not take (it takes several; "
     "model.backbones lists 2); heads that do: bilinear, label_query, lcl, linear, prototype"),
])
def test_mismatches_are_one_line_naming_both_sides_and_what_fits(overrides, message):
    with pytest.raises(CxrlabError) as caught:
        check_parts(load_recipe("demo", overrides))
    assert str(caught.value) == message


def test_matching_parts_pass():
    check_parts(load_recipe("demo", ["model.head=prototype", "loss={dwml: 1.0}"]))
    check_parts(load_recipe("demo", ["regime.name=mpc", "loss={spml_observed: 1.0, mpc_fpc: 1.0, mpc_btc: 1.0}"]))
    check_parts(load_recipe("demo", ["model.head=cross_attention", "model.backbones=[test_resnet, test_resnet]",
                                     "loss={ml_balance: 1.0, can_attention: 0.5}"]))


def test_a_loss_used_outside_a_recipe_still_names_what_it_lacks():
    from cxrlab.losses.base import LossContext
    from cxrlab.output import Output

    ctx = LossContext.from_targets(["a", "b"], np.eye(2), np.ones((2, 2)))
    term = LOSSES.get("dwml")(ctx)
    with pytest.raises(CxrlabError, match=r"^loss dwml needs head prototype \(model.head=prototype\).*similarity"):
        term(Output(torch.zeros(2, 2), {"features": torch.zeros(2, 4)}), {"target": torch.eye(2)})


# ------------------------------------------------------------------------------ declarations are satisfiable

def test_every_head_subclasses_head_and_every_regime_regime():
    assert all(issubclass(HEADS.get(n), Head) for n in HEADS.names())
    assert all(issubclass(REGIMES.get(n), Regime) for n in REGIMES.names())


@pytest.mark.parametrize("loss", LOSSES.names())
def test_every_loss_fits_some_head_and_regime(loss):
    assert any(fits(h, r, loss) for h in HEADS.names() for r in REGIMES.names()), loss


@pytest.mark.parametrize("regime", REGIMES.names())
def test_every_regime_fits_some_head(regime):
    assert any(fits(h, regime, "bce") for h in HEADS.names()), regime


def test_the_satisfiability_check_can_fail():
    """A loss reading an extra no part declares is found (and so is the fix, once a head declares it)."""
    class NeedsNothingKnown(LOSSES.get("bce")):
        requires = frozenset({"no_such_extra"})

    LOSSES._items["_test_unsatisfiable"] = NeedsNothingKnown
    try:
        assert not any(fits(h, r, "_test_unsatisfiable") for h in HEADS.names() for r in REGIMES.names())
    finally:
        del LOSSES._items["_test_unsatisfiable"]


# ------------------------------------------------------------------------ declarations are honest

@pytest.mark.parametrize("name", HEADS.names())
def test_every_head_fills_the_extras_it_declares(name):
    model, args = built_head(name)
    head = model.head
    out = model.train()(torch.rand(2, 1, 32, 32))
    assert out.logits.shape == (2, LABELS)
    declared = type(head).extras_for(args)
    assert set(out.extras) >= declared, f"{name} declares {sorted(declared - set(out.extras))} but does not fill them"


def test_extras_for_follows_head_args():
    model, args = built_head("cross_attention", {"auxiliary": False})
    out = model(torch.rand(2, 1, 32, 32))
    assert "cross_logits" not in out.extras and "cross_logits" not in type(model.head).extras_for(args)
    assert set(out.extras) >= type(model.head).extras_for(args)


# which method a capability stands for; NATIVE_MAPS may come from the attention extra instead
METHODS = {Capability.CORRELATION: "correlation", Capability.LABEL_TEXT: "set_label_text",
           Capability.COOCCURRENCE: "set_cooccurrence", Capability.NATIVE_MAPS: "native_maps"}


@pytest.mark.parametrize("name", HEADS.names())
def test_capabilities_match_what_the_head_does(name):
    head_cls = HEADS.get(name)
    for capability, method in METHODS.items():
        overridden = getattr(head_cls, method) is not getattr(Head, method)
        if capability is Capability.NATIVE_MAPS:
            overridden = overridden or "attention" in head_cls.provides
        assert (capability in head_cls.capabilities) == overridden, (name, capability)
    model, _ = built_head(name)
    x = torch.rand(2, 1, 32, 32)
    fmap = model.features(x)
    out = model.head(fmap)
    maps = model.head.native_maps(fmap, out)
    if Capability.NATIVE_MAPS in head_cls.capabilities:
        assert maps.ndim == 4 and maps.shape[:2] == (2, LABELS)
    else:
        assert maps is None
    if Capability.CORRELATION in head_cls.capabilities:
        g = model.head.correlation()
        assert g.shape == (LABELS, LABELS)
        torch.testing.assert_close(g.sum(-1), torch.ones(LABELS))
    else:
        with pytest.raises(CxrlabError, match="no label correlation"):
            model.head.correlation()


@pytest.mark.parametrize("args", [{}, {"fpc": False}, {"btc": False, "fpc": False}])
def test_mpc_fills_the_extras_it_declares(args):
    model, _ = built_head("linear")
    regime = REGIMES.get("mpc")(lambda x: x, lambda x: x.flip(-1), feature_dim=model.backbone.num_features,
                                btc_heads=1, **args)
    batch = {"image": torch.rand(4, 1, 32, 32), "target": torch.eye(4, LABELS), "mask": torch.eye(4, LABELS)}
    out = regime.step(model, batch)
    declared = REGIMES.get("mpc").extras_for(args)
    assert set(out.extras) == declared | set(model.head(model.features(batch["image"])).extras)


# ------------------------------------------------------------------------------ no capability probing

# the head and regime API: a hasattr/getattr on one of these names is a capability probe
API = ("head", "set_cooccurrence", "correlation", "epoch_stats", "set_label_text", "fc", "feature_maps", "one_feature_map",
       "heatmap_note", "text_identity", "native_maps", "provides", "capabilities", "requires", "extras_for",
       "args_for_weights", "takes_several_maps")
PROBE = re.compile(r"\b(?:hasattr|getattr)\(\s*(?:[\w.]*\bhead\b[^,]*|[^,()]+),\s*[\"'](?:%s)[\"']"
                   % "|".join(API) + r"|\b(?:hasattr|getattr)\(\s*[\w.]*\bhead\b")


def probes(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if PROBE.search(line)]


def test_no_capability_is_found_by_probing():
    found = [f"{p.relative_to(SRC)}: {line}" for p in sorted(SRC.rglob("*.py")) for line in probes(p.read_text())]
    assert not found, "\n".join(found)


def test_the_probe_search_sees_the_old_forms():
    old = '''
    if hasattr(model.head, "set_cooccurrence"):
    head = getattr(trainer.model, "head", None)
    stats = self.regime.epoch_stats() if hasattr(self.regime, "epoch_stats") else {}
    fc = getattr(model.head, "fc", None)
    several = getattr(head_cls, "feature_maps", "one") == "several"
    if getattr(regime_cls, "one_feature_map", False) and n > 1:
    '''
    assert len(probes(old)) == 6 and probes(old)[1] == 'head = getattr(trainer.model, "head", None)'
    assert probes('if hasattr(x, "detach"):\nfn = getattr(loader, "set_epoch", None)') == []
