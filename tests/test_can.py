"""CAN: balance loss by hand, β from counts, attention loss, cross-attention head shapes and range,
gradients into both backbones, a two-backbone run that learns, round-trips, resumes exactly, and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_trainer import LABELS, StopAt, ToySet, flat, noisy

from cxrlab.config import from_dict
from cxrlab.errors import CxrlabError
from cxrlab.losses.base import LossContext, Objective
from cxrlab.models import build_from_config, build_model
from cxrlab.output import Output
from cxrlab.regimes.base import Supervised


def ctx_from(target, mask=None):
    target = np.asarray(target, dtype=np.float32)
    mask = np.ones_like(target) if mask is None else np.asarray(mask, dtype=np.float32)
    return LossContext.from_targets(tuple(f"l{i}" for i in range(target.shape[1])), target, mask)


def term(name, ctx, **args):
    from cxrlab.registry import LOSSES

    return LOSSES.get(name)(ctx, **args)


def logit(p):
    return math.log(p / (1 - p))


# ------------------------------------------------------------------------------------------ losses

def test_balance_loss_is_bce_at_gamma_0_beta_1():
    torch.manual_seed(0)
    logits = torch.randn(6, 4) * 3
    target = (torch.rand(6, 4) < 0.4).float()
    mask = (torch.rand(6, 4) < 0.8).float()
    loss = term("ml_balance", ctx_from(target.numpy()), gamma=0.0, beta="none")
    got = loss(Output(logits), {"target": target, "mask": mask})
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    torch.testing.assert_close(got, (bce * mask).sum() / mask.sum())


def test_balance_loss_down_weights_easy_examples_by_hand():
    # an easy positive (p = 0.9) and a hard one (p = 0.1), β = 1
    logits = torch.tensor([[logit(0.9)], [logit(0.1)]])
    batch = {"target": torch.ones(2, 1), "mask": torch.ones(2, 1)}
    ratios = []
    for gamma in (0.0, 1.0, 2.0):
        loss = term("ml_balance", ctx_from([[1.0]]), gamma=gamma, beta="none")
        easy = loss(Output(logits[:1]), {k: v[:1] for k, v in batch.items()})
        hard = loss(Output(logits[1:]), {k: v[1:] for k, v in batch.items()})
        # −(1 − p)^γ log p: easy 0.1^γ · 0.10536, hard 0.9^γ · 2.30259
        assert float(easy) == pytest.approx(0.1 ** gamma * -math.log(0.9), rel=1e-5)
        assert float(hard) == pytest.approx(0.9 ** gamma * -math.log(0.1), rel=1e-5)
        both = loss(Output(logits), batch)
        assert float(both) == pytest.approx((float(easy) + float(hard)) / 2, rel=1e-5)
        ratios.append(float(easy) / float(hard))
    assert ratios[0] > ratios[1] > ratios[2]
    assert ratios[2] == pytest.approx((0.1 / 0.9) ** 2 * math.log(0.9) / math.log(0.1), rel=1e-5)
    # and for a negative: −p^γ log(1 − p), an easy negative at p = 0.2 with γ = 2
    neg = term("ml_balance", ctx_from([[0.0]]), gamma=2.0, beta="none")
    value = neg(Output(torch.tensor([[logit(0.2)]])), {"target": torch.zeros(1, 1), "mask": torch.ones(1, 1)})
    assert float(value) == pytest.approx(0.2 ** 2 * -math.log(0.8), rel=1e-5)


def test_beta_from_a_tiny_label_matrix():
    target = [[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 1]]
    mask = [[1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 1, 1]]  # image 4's first label unknown
    loss = term("ml_balance", ctx_from(target, mask), gamma=0.0, beta="train")
    # label 0: 2 known positives, 1 known negative; label 1: 1 / 3; label 2: 1 / 3
    torch.testing.assert_close(loss.beta_pos, torch.tensor([1 / 3, 3 / 4, 3 / 4]))
    torch.testing.assert_close(loss.beta_neg, torch.tensor([2 / 3, 1 / 4, 1 / 4]))
    # one hand-computed value: logits 0 everywhere, γ = 0 -> every entry costs β · log 2
    t, m = torch.tensor(target, dtype=torch.float32), torch.tensor(mask, dtype=torch.float32)
    value = loss(Output(torch.zeros(4, 3)), {"target": t, "mask": m})
    weights = t * loss.beta_pos + (1 - t) * loss.beta_neg
    assert float(value) == pytest.approx(float((weights * m).sum() / m.sum()) * math.log(2), rel=1e-6)
    # per batch: counted on the batch given (here: images 1 and 3 only)
    per_batch = term("ml_balance", ctx_from(target, mask), gamma=0.0, beta="batch")
    sub = {"target": t[[0, 2]], "mask": m[[0, 2]]}
    got = per_batch(Output(torch.zeros(2, 3)), sub)
    # label 0: 1 pos, 1 neg -> 1/2 each; labels 1, 2: no positive -> β⁻ = 0, so their negatives cost nothing
    assert float(got) == pytest.approx((0.5 + 0.5) * math.log(2) / 6, rel=1e-6)
    with pytest.raises(CxrlabError, match="beta.*'batch'"):
        term("ml_balance", ctx_from(target), beta="batches")


def test_can_attention_by_hand_and_needs_the_cross_attention_extras():
    ctx = ctx_from([[1, 0], [0, 1]])
    loss = term("can_attention", ctx, gamma=0.0, beta="none", mu=0.1)
    cross = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    streams = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 2.0], [0.0, -2.0]]])  # B×2×L
    batch = {"target": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "mask": torch.ones(2, 2)}
    out = Output(torch.zeros(2, 2), {"cross_logits": cross, "stream_logits": streams})
    bce = F.binary_cross_entropy_with_logits(cross, batch["target"])
    s = torch.sigmoid(streams)
    expected = bce + 0.1 * ((s[:, 0] - s[:, 1]) ** 2).mean()
    torch.testing.assert_close(loss(out, batch), expected)
    with pytest.raises(CxrlabError, match="can_attention needs head cross_attention.*'features'"):
        loss(Output(torch.zeros(2, 2), {"features": torch.zeros(2, 3)}), batch)


# -------------------------------------------------------------------------------------------- head

def can_model(num_labels=3, **head_args):
    args = {"dim": 16, **head_args}
    return build_model(["test_resnet", "test_resnet"], "cross_attention", num_labels, output_stride=8,
                       head_args=args)  # 4×4 maps at 32 px


def test_attention_maps_shapes_and_range():
    torch.manual_seed(0)
    model = can_model(5)
    with torch.no_grad():
        out = model(torch.rand(2, 1, 32, 32))
    assert out.logits.shape == (2, 5)
    att = out.extras["attention"]
    assert att.shape == (2, 5, 4, 4) and float(att.min()) >= 0 and float(att.max()) <= 1
    assert out.extras["stream_logits"].shape == (2, 2, 5) and out.extras["cross_logits"].shape == (2, 5)
    assert out.extras["cross_pooled"].shape == (2, 16)
    torch.testing.assert_close(out.logits, out.extras["stream_logits"].mean(1))
    with torch.no_grad():
        shared = can_model(5, shared_attention=True)(torch.rand(2, 1, 32, 32)).extras["attention"]
        assert shared.shape == (2, 5, 4, 4) and torch.equal(shared[:, 0], shared[:, 4])
        assert "cross_logits" not in can_model(5, auxiliary=False)(torch.rand(1, 1, 32, 32)).extras


def test_head_mathematics_on_given_maps():
    """Attention = sigmoid(conv(F1' ⊙ F2')), pooling = mean(M ⊙ F'), logits = mean of streams."""
    from cxrlab.models.heads.cross_attention import CrossAttentionHead

    torch.manual_seed(1)
    head = CrossAttentionHead([4, 6], 2, dim=3)
    f1, f2 = torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3)
    out = head([f1, f2])
    a1, a2 = head.align[0](f1), head.align[1](f2)
    m = torch.sigmoid(head.attend(a1 * a2))
    torch.testing.assert_close(out.extras["attention"], m)
    z1 = (m[:, :, None] * a1[:, None]).mean(dim=(3, 4))  # B×L×dim
    s1 = (z1 * head.cls_weight[0]).sum(-1) + head.cls_bias[0]
    torch.testing.assert_close(out.extras["stream_logits"][:, 0], s1)
    torch.testing.assert_close(out.extras["cross_pooled"], (a1 * a2).mean(dim=(2, 3)))


def test_gradients_reach_both_backbones():
    torch.manual_seed(0)
    model = can_model(3)
    x = torch.rand(4, 1, 32, 32)
    batch = {"target": (torch.rand(4, 3) < 0.5).float(), "mask": torch.ones(4, 3)}
    objective = Objective({"ml_balance": 1.0, "can_attention": 1.0}, ctx_from(batch["target"].numpy()))
    loss, logged = objective(model(x), batch)
    loss.backward()
    for k in range(2):
        grads = [p.grad for p in model.backbone[k].parameters()]
        assert all(g is not None for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0, f"backbone {k} got no gradient"
    assert all(p.grad is not None for p in model.head.parameters())
    assert set(logged) == {"ml_balance", "can_attention", "loss"}


def test_maps_of_different_sizes():
    from cxrlab.models.heads.cross_attention import CrossAttentionHead

    head = CrossAttentionHead([4, 4], 2, dim=3)
    out = head([torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)])
    assert out.extras["attention"].shape == (1, 2, 4, 4)  # pooled to the smaller map
    with pytest.raises(CxrlabError, match=r"cannot align feature maps of shapes \[\(1, 4, 8, 4\), \(1, 4, 4, 8\)\]"):
        head([torch.randn(1, 4, 8, 4), torch.randn(1, 4, 4, 8)])
    strict = CrossAttentionHead([4, 4], 2, dim=3, resize="none")
    with pytest.raises(CxrlabError, match=r"different sizes .*\(1, 4, 8, 8\).*resize='none'"):
        strict([torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)])
    with pytest.raises(CxrlabError, match=r"expected maps B×4×h×w, B×4×h×w, got shapes \[\(1, 5, 4, 4\)"):
        head([torch.randn(1, 5, 4, 4), torch.randn(1, 4, 4, 4)])
    with pytest.raises(CxrlabError, match="needs the feature maps of 2 backbones"):
        head(torch.randn(1, 4, 4, 4))


def test_one_backbone_or_three_is_refused():
    with pytest.raises(CxrlabError, match=r"cross_attention' needs several backbones.*model\.backbones"):
        build_model("test_resnet", "cross_attention", 3)
    with pytest.raises(CxrlabError, match="takes exactly 2 backbones, model.backbones names 3"):
        build_model(["test_resnet"] * 3, "cross_attention", 3)
    with pytest.raises(CxrlabError, match="concat' needs several backbones"):
        build_model("test_resnet", "concat", 3)


def test_concat_head():
    model = build_model(["test_resnet", "test_resnet"], "concat", 3)
    x = torch.rand(2, 1, 32, 32)
    out = model(x)
    maps = model.features(x)
    assert isinstance(maps, list) and len(maps) == 2
    pooled = torch.cat([m.mean(dim=(2, 3)) for m in maps], 1)
    torch.testing.assert_close(out.logits, model.head.classifier(pooled))


# ------------------------------------------------------------------------------ training, checkpoints

def can_recipe(backbones=("test_resnet", "test_resnet"), output_stride=16, **train):
    return from_dict({
        "model": {"backbones": list(backbones), "output_stride": output_stride, "head": "cross_attention",
                  "head_args": {"dim": 16}},
        "loss": {"ml_balance": 1.0, "can_attention": 1.0},
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 1e-4},
        "schedule": {"name": "cosine", "warmup_epochs": 0.5},
        "data": {"image_size": 32},
        "train": {"epochs": 3, "batch_size": 16, "seed": 0, "amp": "off", **train},
    })


def can_run(tmp_path, recipe, n_train=64, n_val=32, resume=False, regime=None, out="run"):
    from cxrlab.engine.trainer import Trainer, make_loader, seed_everything

    train_set, val_set = ToySet(n_train, 1, unknown=0.1), ToySet(n_val, 2)
    seed_everything(recipe.train.seed)
    model = build_from_config(recipe.model, len(LABELS))
    objective = Objective(recipe.loss, LossContext.from_targets(LABELS, train_set.target, train_set.mask))
    trainer = Trainer(recipe, model, objective, regime or Supervised(noisy, noisy), tmp_path / out, LABELS)
    loaders = (make_loader(train_set, recipe.train.batch_size, shuffle=True, seed=recipe.train.seed),
               make_loader(val_set, recipe.train.batch_size, shuffle=False, seed=recipe.train.seed))
    return trainer, trainer.fit(*loaders, resume=resume), loaders


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("can")
    return can_run(tmp, can_recipe(epochs=3)), tmp


def test_two_backbones_learn_and_round_trip(trained):
    from cxrlab.checkpoint import load_model

    (trainer, result, (_, val_loader)), tmp = trained
    history = result.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert result.best["val_macro_auc"] > 0.75  # chance is 0.5
    model, info = load_model(tmp / "run")
    assert [b["name"] if isinstance(b, dict) else b for b in info["recipe"]["model"]["backbones"]] == \
        ["test_resnet", "test_resnet"]
    probs, _, _ = trainer.predict(val_loader)
    with torch.no_grad():
        mine = torch.cat([torch.sigmoid(model(b["image"].float() / 255).logits) for b in val_loader]).numpy()
    np.testing.assert_allclose(mine, probs, atol=1e-6)


def test_heatmaps_read_the_cross_attention_maps(trained):
    from cxrlab.checkpoint import load_model
    from cxrlab.inference.heatmaps import label_heatmaps

    _, tmp = trained
    model, _ = load_model(tmp / "run")
    x = torch.rand(2, 1, 32, 32)
    probs, maps = label_heatmaps(model, x)
    assert probs.shape == (2, 3) and maps.shape == (2, 3, 32, 32)
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6


def test_two_backbone_resume_is_exact(tmp_path):
    from test_trainer import Interrupt

    recipe = can_recipe(output_stride=None, epochs=2)  # 1×1 maps: only the mechanics matter here
    full, full_result, _ = can_run(tmp_path, recipe, n_train=32, n_val=16, out="full")
    steps_per_epoch = 32 // 16
    with pytest.raises(Interrupt):  # dies in epoch 2, after epoch 1's checkpoint
        can_run(tmp_path, recipe, n_train=32, n_val=16, out="cut", regime=StopAt(steps_per_epoch + 1))
    resumed, resumed_result, _ = can_run(tmp_path, recipe, n_train=32, n_val=16, out="cut", resume=True)
    assert torch.equal(flat(full.model), flat(resumed.model))
    for a, b in zip(full_result.history, resumed_result.history, strict=True):
        for key in ("train_loss", "val_loss", "val_macro_auc", "step"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    # resuming with another backbone list is refused by name
    other = can_recipe(backbones=("test_resnet", "test_convnext"), output_stride=None, epochs=3)
    with pytest.raises(CxrlabError, match=r"model\.backbones is \['test_resnet', 'test_resnet'\] but this "
                                          r"recipe's is \['test_resnet', 'test_convnext'\]"):
        can_run(tmp_path, other, n_train=32, n_val=16, out="cut", resume=True)


def test_can_recipes_follow_their_protocols():
    from cxrlab.config import load_recipe
    from cxrlab.models import backbone_specs, check_model

    nih, chexpert = load_recipe("can_nih"), load_recipe("can_chexpert")
    assert (nih.data.labels, nih.data.split, nih.data.image_size) == ("nih14", "official", 224)
    assert (chexpert.data.labels, chexpert.data.policy, chexpert.data.split, chexpert.data.image_size) == \
        ("chexpert5", "u_ones", "official", 224)
    for recipe in (nih, chexpert):
        assert recipe.model.head == "cross_attention" and len(backbone_specs(recipe.model)) == 2
        assert set(recipe.loss) == {"ml_balance", "can_attention"} and recipe.loss["can_attention"]["mu"] == 0.1
        baseline = load_recipe(f"{recipe.name}_baseline")
        assert len(backbone_specs(baseline.model)) == 1 and baseline.model.head == "linear"
        assert (baseline.data, baseline.optim, baseline.schedule, baseline.train) == \
            (recipe.data, recipe.optim, recipe.schedule, recipe.train)  # same budget
    family = ["can_synthetic", "can_synthetic_no_attention_loss", "can_synthetic_concat", "can_synthetic_bce",
              "can_synthetic_balance"]
    recipes = [load_recipe(n) for n in family]
    for r in recipes:
        check_model(r.model)
        assert (r.data, r.optim, r.train, r.model.output_stride) == (recipes[0].data, recipes[0].optim,
                                                                    recipes[0].train, 8)
