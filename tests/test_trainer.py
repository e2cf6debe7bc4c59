"""Trainer: learns a toy task, is deterministic, resumes exactly, logs, stops early, selects."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from cxrlab.config import Recipe, from_dict
from cxrlab.engine.trainer import Trainer, make_loader, seed_everything
from cxrlab.losses.base import LossContext, Objective
from cxrlab.models import build_model
from cxrlab.regimes.base import Supervised

LABELS = ("left", "top", "centre")


class ToySet(torch.utils.data.Dataset):
    """32×32 noise images; each label adds its own bright pattern, so a small CNN learns them fast.
    ``unknown`` masks that share of the training entries (their targets are scrambled)."""

    def __init__(self, n: int, seed: int, unknown: float = 0.0, size: int = 32):
        rng = np.random.default_rng(seed)
        self.target = (rng.random((n, 3)) < 0.4).astype(np.float32)
        img = rng.integers(0, 120, (n, 1, size, size)).astype(np.int32)
        h = size // 2
        img[self.target[:, 0] == 1, :, :, :h] += 80
        img[self.target[:, 1] == 1, :, :h, :] += 80
        c = size // 4
        img[self.target[:, 2] == 1, :, c:3 * c, c:3 * c] += 120
        self.image = np.clip(img, 0, 255).astype(np.uint8)
        self.mask = (rng.random((n, 3)) >= unknown).astype(np.float32)
        self.target = np.where(self.mask == 1, self.target, rng.integers(0, 2, (n, 3))).astype(np.float32)

    def __len__(self):
        return len(self.target)

    def __getitem__(self, i):
        return {"image": torch.from_numpy(self.image[i]), "target": torch.from_numpy(self.target[i]),
                "mask": torch.from_numpy(self.mask[i]), "index": torch.tensor(i, dtype=torch.int64)}


def toy_recipe(**train) -> Recipe:
    return from_dict({
        "model": {"backbone": "test_resnet", "head": "linear"},
        "loss": {"bce": 1.0},
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 1e-4},
        "schedule": {"name": "cosine", "warmup_epochs": 0.5},
        "data": {"image_size": 32},
        "train": {"epochs": 3, "batch_size": 16, "seed": 0, "amp": "off", **train},
    })


def noisy(x: torch.Tensor) -> torch.Tensor:
    """A random augmentation drawing on the global RNGs (so resuming must restore them)."""
    return x + 0.05 * torch.randn_like(x) + float(np.random.rand()) * 0.01


def toy_parts(recipe: Recipe, train_set: ToySet):
    """What experiment.run does: seed, then model, objective, regime."""
    seed_everything(recipe.train.seed)
    model = build_model(recipe.model.backbone, recipe.model.head, len(LABELS), drop_rate=0.1)
    ctx = LossContext.from_targets(LABELS, train_set.target, train_set.mask)
    objective = Objective(recipe.loss, ctx)
    return model, objective, Supervised(noisy, noisy)


def toy_run(tmp_path, recipe: Recipe, n_train=160, n_val=64, resume=False, regime=None, out="run"):
    train_set, val_set = ToySet(n_train, 1, unknown=0.1), ToySet(n_val, 2)
    model, objective, default_regime = toy_parts(recipe, train_set)
    trainer = Trainer(recipe, model, objective, regime or default_regime, tmp_path / out, LABELS)
    loaders = (make_loader(train_set, recipe.train.batch_size, shuffle=True, seed=recipe.train.seed),
               make_loader(val_set, recipe.train.batch_size, shuffle=False, seed=recipe.train.seed))
    return trainer, trainer.fit(*loaders, resume=resume), loaders


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([v.detach().flatten().double() for v in model.state_dict().values()])


def test_learns_toy_task_and_writes_logs(tmp_path):
    trainer, result, (_, val_loader) = toy_run(tmp_path, toy_recipe(epochs=3))
    assert result.best["val_macro_auc"] > 0.9
    assert result.checkpoint == tmp_path / "run" / "best"
    assert (tmp_path / "run" / "last" / "model.safetensors").is_file()
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert len(rows) == 3
    for column in ("epoch", "lr", "train_bce", "train_loss", "train_img_s", "val_loss", "val_macro_auc"):
        assert column in rows[0], column
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    probs, targets, masks = trainer.predict(val_loader)
    assert probs.shape == targets.shape == masks.shape == (64, 3) and probs.dtype == np.float32
    np.testing.assert_array_equal(targets, ToySet(64, 2).target)
    from sklearn.metrics import roc_auc_score

    assert np.mean([roc_auc_score(targets[:, j], probs[:, j]) for j in range(3)]) == pytest.approx(
        result.best["val_macro_auc"], abs=1e-6)  # predict = the selected (best) weights


def test_deterministic_under_seed(tmp_path):
    a, ra, _ = toy_run(tmp_path, toy_recipe(epochs=1), n_train=64, n_val=32, out="a")
    b, rb, _ = toy_run(tmp_path, toy_recipe(epochs=1), n_train=64, n_val=32, out="b")
    assert torch.equal(flat(a.model), flat(b.model))
    assert ra.history[0]["train_loss"] == rb.history[0]["train_loss"]


class Interrupt(Exception):
    pass


class StopAt(Supervised):
    """A run killed mid-way through epoch ``stop_epoch`` (after some of its steps have run)."""

    def __init__(self, stop_step: int):
        super().__init__(noisy, noisy)
        self.calls, self.stop_step = 0, stop_step

    def step(self, model, batch):
        self.calls += 1
        if self.calls > self.stop_step:
            raise Interrupt
        return super().step(model, batch)


@pytest.mark.parametrize("ema", [None, 0.9])
def test_resume_is_exact(tmp_path, ema):
    recipe = toy_recipe(epochs=4, ema=ema, grad_clip=1.0)
    full, full_result, _ = toy_run(tmp_path, recipe, n_train=64, n_val=32, out="full")
    steps_per_epoch = 64 // 16
    with pytest.raises(Interrupt):  # dies in epoch 3, after epoch 2's checkpoint
        toy_run(tmp_path, recipe, n_train=64, n_val=32, out="cut", regime=StopAt(2 * steps_per_epoch + 1))
    resumed, resumed_result, _ = toy_run(tmp_path, recipe, n_train=64, n_val=32, out="cut", resume=True)
    assert torch.equal(flat(full.model), flat(resumed.model))
    if ema:
        assert torch.equal(flat(full.ema.module), flat(resumed.ema.module))
    for a, b in zip(full_result.history, resumed_result.history, strict=True):
        for key in ("train_loss", "val_loss", "val_macro_auc", "lr", "step"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    last_full = open(tmp_path / "full" / "log.csv").read().splitlines()
    last_cut = open(tmp_path / "cut" / "log.csv").read().splitlines()
    assert len(last_full) == len(last_cut) == 5


def test_early_stopping_and_select_on_loss(tmp_path, monkeypatch):
    losses = iter([1.0, 0.5, 0.7, 0.6, 0.8])
    monkeypatch.setattr(Trainer, "validate", lambda self, loader: {"val_loss": next(losses), "val_macro_auc": 0.5})
    _, result, _ = toy_run(tmp_path, toy_recipe(epochs=5, early_stop_patience=2, select_on="loss"),
                           n_train=32, n_val=16)
    assert result.stopped_early and len(result.history) == 4
    assert result.best_epoch == 2 and result.best["val_loss"] == 0.5
    best = json.loads((tmp_path / "run" / "best" / "checkpoint.json").read_text())
    assert best["epoch"] == 2 and best["metrics"]["val_loss"] == 0.5


def test_epoch_stats_from_regime_are_logged(tmp_path):
    class Counting(Supervised):
        def __init__(self):
            super().__init__(lambda x: x, lambda x: x)
            self.n = 0

        def step(self, model, batch):
            self.n += batch["image"].shape[0]
            return super().step(model, batch)

        def epoch_stats(self):
            n, self.n = self.n, 0
            return {"seen_images": n}

    _, result, _ = toy_run(tmp_path, toy_recipe(epochs=2), n_train=32, n_val=16, regime=Counting())
    assert [s["seen_images"] for s in result.epoch_stats] == [32.0, 32.0]
    assert "seen_images" in open(tmp_path / "run" / "log.csv").readline()


def test_bf16_autocast_on_cpu_runs_in_bf16(tmp_path):
    class Recording(Supervised):
        def __init__(self):
            super().__init__(lambda x: x, lambda x: x)
            self.dtypes = set()

        def step(self, model, batch):
            out = super().step(model, batch)
            self.dtypes.add(out.logits.dtype)
            return out

    regime = Recording()
    _, result, _ = toy_run(tmp_path, toy_recipe(epochs=1, amp="bf16", channels_last=True), n_train=32, n_val=16,
                           regime=regime)
    assert regime.dtypes == {torch.bfloat16}  # an autocast that fell back to fp32 would show float32 here
    assert np.isfinite(result.history[0]["train_loss"])


def test_bad_settings_are_named(tmp_path):
    from cxrlab.errors import CxrlabError

    with pytest.raises(CxrlabError, match="select_on"):
        toy_run(tmp_path, toy_recipe(select_on="auc"), n_train=16, n_val=16)
    with pytest.raises(CxrlabError, match="fp16"):
        toy_run(tmp_path, toy_recipe(amp="fp16"), n_train=16, n_val=16)


# ---------------------------------------------------------------------------------------------- optim

class LabelMatrix(torch.nn.Module):
    """Stands in for a loss term with its own parameters (ROLE's label matrix)."""

    lr_multiplier = 10.0

    def __init__(self):
        super().__init__()
        self.matrix = torch.nn.Parameter(torch.zeros(4, 3))


def test_param_groups():
    from cxrlab.engine.optim import build_optimizer
    from cxrlab.config import OptimConfig

    model = build_model("test_resnet", "linear", 3)
    extra = torch.nn.ModuleDict({"proj": torch.nn.Linear(3, 3)})
    objective = torch.nn.Module()
    objective.terms = torch.nn.ModuleDict({"role": LabelMatrix()})
    opt = build_optimizer(OptimConfig(name="adamw", lr=0.01, weight_decay=0.05), [model, extra], objective)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"decay", "no_decay", "loss.role"}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in groups["decay"]["params"])
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert id(model.head.fc.bias) in no_decay and id(extra["proj"].bias) in no_decay
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert id(bn.weight) in no_decay and id(extra["proj"].weight) in {id(p) for p in groups["decay"]["params"]}
    assert groups["loss.role"]["lr"] == pytest.approx(0.1) and groups["loss.role"]["weight_decay"] == 0.0
    n_all = sum(1 for _ in model.parameters()) + 2 + 1
    assert sum(len(g["params"]) for g in opt.param_groups) == n_all
    sgd = build_optimizer(OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True), [model])
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]
    # adam's weight decay is L2 (added to the gradient, then normalised: the first step moves by lr),
    # adamw's is decoupled (a zero gradient leaves only the shrink by lr * weight_decay)
    for name, expected in (("adam", 1.0 - 0.1), ("adamw", 1.0 - 0.1 * 0.5)):
        layer = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.ones_(layer.weight)
        opt = build_optimizer(OptimConfig(name=name, lr=0.1, weight_decay=0.5), [layer])
        assert isinstance(opt, torch.optim.Adam if name == "adam" else torch.optim.AdamW)
        (layer.weight * 0.0).sum().backward()
        opt.step()
        assert float(layer.weight.detach()) == pytest.approx(expected, rel=1e-5)
    from cxrlab.errors import CxrlabError

    with pytest.raises(CxrlabError, match="adamw, adam, sgd"):
        build_optimizer(OptimConfig(name="adamm"), [model])


def test_schedules():
    from cxrlab.config import ScheduleConfig
    from cxrlab.engine.optim import build_scheduler, lr_factor

    cos = ScheduleConfig(name="cosine", warmup_epochs=0.5)
    f = [lr_factor(cos, s, epochs=3, steps_per_epoch=10) for s in range(30)]
    assert f[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # half an epoch of linear warm-up
    assert f[5] == pytest.approx(1.0) and f[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 24 / 25)))
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    step = ScheduleConfig(name="step", warmup_epochs=0, step_size=2, gamma=0.1)
    assert [lr_factor(step, s * 10, 5, 10) for s in range(5)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    const = ScheduleConfig(name="constant", warmup_epochs=1)
    assert [lr_factor(const, s, 2, 2) for s in range(4)] == pytest.approx([0.5, 1, 1, 1])

    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": [net.weight], "lr": 1.0}, {"params": [net.bias], "lr": 10.0}], lr=1.0)
    sched = build_scheduler(cos, opt, 3, 10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2, 2.0])  # multipliers kept
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4, 4.0])
    from cxrlab.errors import CxrlabError

    with pytest.raises(CxrlabError, match="schedule.name"):
        build_scheduler(ScheduleConfig(name="linear"), opt, 3, 10)
