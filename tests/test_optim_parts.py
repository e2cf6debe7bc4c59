"""Per-part learning rates, new-parameter warm-up, freezing and init_from (issue: fair method comparisons)."""
from __future__ import annotations

import pytest
import torch

from cxrlab.checkpoint import module_tensors, save_checkpoint
from cxrlab.config import OptimConfig, Recipe, ScheduleConfig, from_dict
from cxrlab.engine.optim import build_optimizer, build_scheduler, model_parts
from cxrlab.errors import CxrlabError
from cxrlab.models import build_model
from cxrlab.models.parts import freeze, load_parts

from test_trainer import Interrupt, StopAt, flat, toy_recipe, toy_run


def _groups(opt):
    return {g["name"]: g for g in opt.param_groups}


def test_each_part_gets_its_multiplier_with_the_decay_split_kept():
    model = build_model("test_resnet", "linear", 3)
    regime = torch.nn.ModuleDict({"proj": torch.nn.Linear(4, 4)})
    cfg = OptimConfig(lr=0.01, weight_decay=0.05, backbone_lr_mult=0.1, head_lr_mult=2.0, regime_lr_mult=0.5)
    groups = _groups(build_optimizer(cfg, model_parts(model, regime)))
    assert set(groups) == {f"{p}.{d}" for p in ("backbone", "head", "regime") for d in ("decay", "no_decay")}
    lrs = {name: g["lr"] for name, g in groups.items()}
    assert lrs["backbone.decay"] == lrs["backbone.no_decay"] == pytest.approx(0.001)
    assert lrs["head.decay"] == lrs["head.no_decay"] == pytest.approx(0.02)
    assert lrs["regime.decay"] == pytest.approx(0.005)
    assert groups["head.decay"]["weight_decay"] == 0.05 and groups["head.no_decay"]["weight_decay"] == 0.0
    ids = lambda name: {id(p) for p in groups[name]["params"]}  # noqa: E731
    assert ids("head.decay") == {id(model.head.fc.weight)} and ids("head.no_decay") == {id(model.head.fc.bias)}
    assert len(ids("backbone.decay")) + len(ids("backbone.no_decay")) == len(list(model.backbone.parameters()))


def test_schedule_scales_every_group_and_warms_up_only_new_parts():
    model = build_model("test_resnet", "linear", 3)
    cfg = OptimConfig(name="sgd", lr=1.0, backbone_lr_mult=0.1, head_lr_mult=1.0)
    opt = build_optimizer(cfg, model_parts(model))
    sched = build_scheduler(ScheduleConfig(name="constant"), opt, epochs=2, steps_per_epoch=4,
                            new_params_warmup_epochs=1.0)
    seen = []
    for _ in range(6):
        seen.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    # head ramps 1/4, 2/4, 3/4, 1 over its first epoch (4 steps); the backbone is not ramped
    assert [s["head.decay"] for s in seen] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert [s["backbone.decay"] for s in seen] == pytest.approx([0.1] * 6)
    with pytest.raises(CxrlabError, match="new_params_warmup_epochs"):
        build_scheduler(ScheduleConfig(), opt, 2, 4, new_params_warmup_epochs=-1)


def test_bad_multipliers_are_refused_at_recipe_load():
    with pytest.raises(CxrlabError, match="optim.head_lr_mult"):
        from_dict({"optim": {"head_lr_mult": -0.1}})
    with pytest.raises(CxrlabError, match="head_lr_mult"):
        from_dict({"optim": {"head_lr_mul": 0.1}})  # the closest key is suggested


def test_frozen_parts_leave_the_optimiser_and_do_not_move():
    torch.manual_seed(0)
    model = build_model("test_resnet", "linear", 3)
    frozen = freeze(model, "backbone")
    assert frozen and all(name.startswith("backbone.") for name in frozen)
    opt = build_optimizer(OptimConfig(lr=0.1), model_parts(model))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in model.backbone.parameters())
    assert set(_groups(opt)) == {"head.decay", "head.no_decay"}
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.fc.weight.detach().clone()
    model.train()  # a frozen BatchNorm must not update its running statistics even in train mode
    for _ in range(2):
        loss = model(torch.rand(4, 1, 32, 32)).logits.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    assert not bn.training and not torch.equal(head_before, model.head.fc.weight)


def test_freeze_a_stage_by_prefix_and_unknown_names():
    model = build_model("test_resnet", "linear", 3)
    stage = next(n for n, _ in model.backbone.net.named_children() if n.startswith("layer"))
    frozen = freeze(model, [f"backbone.net.{stage}"])
    assert frozen and all(n.startswith(f"backbone.net.{stage}.") for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if n not in frozen)
    with pytest.raises(CxrlabError, match=r"no part 'backbone.nett'; did you mean 'backbone.net'"):
        freeze(build_model("test_resnet", "linear", 3), ["backbone.nett"])
    with pytest.raises(CxrlabError, match="model.freeze must be"):
        freeze(model, [3])


def _checkpoint(folder, head="linear", seed=0):
    recipe = Recipe()
    recipe.model.backbone, recipe.model.head, recipe.data.image_size = "test_resnet", head, 32
    torch.manual_seed(seed)
    model = build_model("test_resnet", head, 3)
    info = {"recipe": recipe.to_dict(), "labels": ["a", "b", "c"], "thresholds": [0.5] * 3}
    save_checkpoint(folder, module_tensors({"model": model}), {}, {"state": {}, "param_groups": []}, info)
    return model


def test_init_from_loads_parts_strictly(tmp_path):
    from cxrlab import checkpoint as ckpt

    source = _checkpoint(tmp_path / "stage1")
    info = ckpt.read_info(tmp_path / "stage1")
    weights = ckpt.read_tensors(tmp_path / "stage1", ckpt.MODEL_FILE, info, prefix="model")
    torch.manual_seed(1)
    target = build_model("test_resnet", "bilinear", 3)  # another head: only the backbone fits
    head_before = {k: v.clone() for k, v in target.head.state_dict().items()}
    loaded = load_parts(target, weights, ["backbone"], "stage1")
    assert loaded and all(k.startswith("backbone.") for k in loaded)
    assert torch.equal(flat(target.backbone), flat(source.backbone))
    assert all(torch.equal(head_before[k], v) for k, v in target.head.state_dict().items())
    with pytest.raises(CxrlabError, match=r"missing \(e.g. head\..*unexpected \(e.g. head\.fc"):
        load_parts(build_model("test_resnet", "bilinear", 3), weights, None, "stage1")
    wrong = dict(weights, **{"head.fc.weight": torch.zeros(5, 7)})
    with pytest.raises(CxrlabError, match=r"head.fc.weight has shape \(5, 7\)"):
        load_parts(build_model("test_resnet", "linear", 3), wrong, None, "stage1")


def test_init_from_and_freeze_through_a_recipe(tmp_path):
    from cxrlab.workflows.experiment import _init_and_freeze, check_parts

    source = _checkpoint(tmp_path / "runs" / "r0f1" / "best")
    recipe = from_dict({"model": {"backbone": "test_resnet", "head": "linear", "freeze": "backbone",
                                  "init_from": {"path": str(tmp_path / "runs" / "{fold}"), "parts": ["backbone"]}}})
    check_parts(recipe)  # {fold} is only known per fold: not checked for existence here
    model = build_model("test_resnet", "linear", 3)
    _init_and_freeze(model, recipe.model, (0, 1))
    assert torch.equal(flat(model.backbone), flat(source.backbone))
    assert not any(p.requires_grad for p in model.backbone.parameters())
    with pytest.raises(CxrlabError, match="only cv and compare"):
        _init_and_freeze(build_model("test_resnet", "linear", 3), recipe.model, None)
    missing = from_dict({"model": {"init_from": str(tmp_path / "nowhere")}})
    with pytest.raises(CxrlabError, match="checkpoint not found"):
        check_parts(missing)  # a fixed path is checked at recipe load, before any data
    with pytest.raises(CxrlabError, match="unknown key 'part'"):
        check_parts(from_dict({"model": {"init_from": {"path": "x", "part": ["backbone"]}}}))


def test_resume_is_exact_with_part_groups_and_new_part_warm_up(tmp_path):
    recipe = toy_recipe(epochs=3)
    recipe.optim.backbone_lr_mult, recipe.optim.head_lr_mult = 0.3, 3.0
    recipe.optim.new_params_warmup_epochs = 1.5

    def run(**kwargs):
        trainer, result, loaders = toy_run(tmp_path, recipe, n_train=64, n_val=32, **kwargs)
        return trainer, result

    full, full_result = run(out="full")
    assert {g["name"] for g in full.optimizer.param_groups} >= {"backbone.decay", "head.decay"}
    with pytest.raises(Interrupt):
        run(out="cut", regime=StopAt(4 + 1))  # dies in epoch 2, after epoch 1's checkpoint
    resumed, resumed_result = run(out="cut", resume=True)
    assert torch.equal(flat(full.model), flat(resumed.model))
    assert [g["lr"] for g in full.optimizer.param_groups] == [g["lr"] for g in resumed.optimizer.param_groups]
    assert [h["train_loss"] for h in full_result.history] == pytest.approx(
        [h["train_loss"] for h in resumed_result.history], abs=1e-6)
