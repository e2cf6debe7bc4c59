"""LCL heads (lcl, label_query) and losses (lcl_consistency, lcl_supcon): the spec's tests that matter."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cxrlab.errors import CxrlabError
from cxrlab.losses.base import LossContext, Objective
from cxrlab.losses.lcl import LCLConsistency, LCLSupCon
from cxrlab.models import CxrModel
from cxrlab.output import Output
from cxrlab.registry import HEADS, LOSSES

C, D, DIM = 5, 12, 16
HEAD_NAMES = ("lcl", "label_query")


def make_head(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    args = dict(dim=DIM, num_heads=2)
    args.update(kwargs)
    return HEADS.get(name)(D, C, **args)


def ctx(c: int = C) -> LossContext:
    return LossContext.from_targets(tuple(f"l{i}" for i in range(c)), np.zeros((2, c)), np.ones((2, c)))


def fmap(b: int = 3, h: int = 3, w: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, D, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ heads

@pytest.mark.parametrize("name", HEAD_NAMES)
def test_head_shapes_attention_and_correlation(name):
    head = make_head(name)
    out = head(fmap())
    ex = out.extras
    assert out.logits.shape == (3, C)
    assert ex["label_features"].shape == (3, C, DIM)
    assert ex["attention"].shape == (3, C, 3, 4)
    assert ex["label_attention"].shape == (3, C, C)
    assert ex["correlation"].shape == (C, C)
    assert ex["features"].shape == (3, D)
    assert (ex["attention"] >= 0).all()
    torch.testing.assert_close(ex["attention"].sum((2, 3)), torch.ones(3, C))
    torch.testing.assert_close(ex["label_attention"].sum(-1), torch.ones(3, C))
    torch.testing.assert_close(ex["correlation"].sum(-1), torch.ones(C))
    out.logits.sum().backward()  # everything trainable gets a gradient
    assert all(p.grad is not None for p in head.parameters())


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_head_in_a_model_with_timm_backbone(name):
    from cxrlab.models import build_model

    model = build_model("test_resnet", name, 4, head_args={"dim": 32, "num_heads": 4})
    out = model(torch.rand(2, 1, 32, 32))
    assert out.logits.shape == (2, 4)
    torch.testing.assert_close(out.extras["attention"].flatten(2).sum(-1), torch.ones(2, 4))


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_g_moves_only_in_train_mode(name):
    head = make_head(name, ema_momentum=0.9)
    x1, x2 = fmap(seed=1), fmap(seed=2)
    start = head.attention_ema.clone()
    torch.testing.assert_close(start, torch.full((C, C), 1 / C))
    head.eval()
    with torch.no_grad():
        head(x1)
    assert torch.equal(head.attention_ema, start) and int(head.ema_updates) == 0

    head.train()
    out1 = head(x1)
    a1 = out1.extras["label_attention"].detach().mean(0)
    torch.testing.assert_close(head.attention_ema, a1)  # warm-up: the first update is the batch mean
    torch.testing.assert_close(out1.extras["correlation"].detach(), a1)
    assert out1.extras["correlation"].requires_grad  # carries the current batch's gradient (detach_g option)
    out2 = head(x2)
    a2 = out2.extras["label_attention"].detach().mean(0)
    torch.testing.assert_close(head.attention_ema, (a1 + a2) / 2)  # exact mean while n/(n+1) < momentum
    torch.testing.assert_close(head.attention_ema.sum(-1), torch.ones(C))

    moved = head.attention_ema.clone()
    head.eval()
    out = head(x1)
    assert torch.equal(head.attention_ema, moved) and int(head.ema_updates) == 2
    assert torch.equal(out.extras["correlation"], moved) and not out.extras["correlation"].requires_grad


def test_g_plain_ema_without_warmup():
    head = make_head("lcl", ema_momentum=0.75, ema_warmup=False).train()
    a = head(fmap()).extras["label_attention"].detach().mean(0)
    torch.testing.assert_close(head.attention_ema, 0.75 * torch.full((C, C), 1 / C) + 0.25 * a)


def test_correlation_sources():
    learned = make_head("lcl", correlation_source="learned")
    out = learned(fmap())
    torch.testing.assert_close(out.extras["correlation"].sum(-1), torch.ones(C))
    LCLConsistency(ctx(), detach_g=False)(out, {"target": torch.zeros(3, C)}).backward()
    assert learned.correlation_logits.grad.abs().sum() > 0

    head = make_head("lcl", correlation_source="cooccurrence")
    with pytest.raises(CxrlabError, match="set_cooccurrence"):
        head(fmap())
    target = np.array([[1, 1, 0, 0, 0], [1, 0, 0, 1, 0], [0, 1, 0, 1, 0]], dtype=float)
    cooc = LossContext.from_targets(tuple("abcde"), target, np.ones_like(target)).cooccurrence
    head.set_cooccurrence(cooc)
    g = head(fmap()).extras["correlation"]
    expected = cooc / np.where(cooc.sum(1, keepdims=True) > 0, cooc.sum(1, keepdims=True), 1)
    expected[2], expected[4] = np.eye(C)[2], np.eye(C)[4]  # labels never positive: identity rows
    torch.testing.assert_close(g, torch.tensor(expected, dtype=torch.float32))
    with pytest.raises(CxrlabError, match="5×5"):
        head.set_cooccurrence(np.ones((3, 3)))
    fresh = make_head("lcl", correlation_source="cooccurrence")
    fresh.load_state_dict(head.state_dict())  # a loaded checkpoint carries the matrix
    torch.testing.assert_close(fresh(fmap()).extras["correlation"], g)
    backbone = nn.Conv2d(1, D, 3)
    model = CxrModel(backbone, head)
    fresh_model = CxrModel(nn.Conv2d(1, D, 3), make_head("lcl", correlation_source="cooccurrence"))
    fresh_model.load_state_dict(model.state_dict())  # the head as a submodule (keys prefixed "head.")
    torch.testing.assert_close(fresh_model(torch.rand(2, 1, 6, 7)).extras["correlation"], g)

    with pytest.raises(CxrlabError, match="correlation_source"):
        make_head("lcl", correlation_source="cooc")
    with pytest.raises(CxrlabError, match="num_heads"):
        make_head("lcl", dim=10, num_heads=4)


# Per-label parameters and buffers, and which of their axes index labels. Any other tensor with a
# dimension of size C fails the test, so a new per-label parameter cannot be forgotten here.
PER_LABEL = {"spatial_weight": (0,), "queries": (0,), "correlation_block.label_embed": (0,), "cls_weight": (0,),
             "cls_bias": (0,), "attention_ema": (0, 1), "cooccurrence": (0, 1), "correlation_logits": (0, 1)}


def permuted_state(state: dict, perm: torch.Tensor) -> dict:
    out = {}
    for key, value in state.items():
        if key in PER_LABEL:
            for axis in PER_LABEL[key]:
                value = value.index_select(axis, perm)
        else:
            assert C not in value.shape, f"{key} {tuple(value.shape)} looks per-label: add it to PER_LABEL"
        out[key] = value.clone()
    return out


@pytest.mark.parametrize("name,source", [("lcl", "attention"), ("label_query", "attention"), ("lcl", "learned")])
def test_permuting_labels_permutes_every_output(name, source):
    head = make_head(name, correlation_source=source)
    with torch.no_grad():  # non-trivial G state and learned correlation
        head.attention_ema.copy_(torch.softmax(torch.randn(C, C), -1))
        if source == "learned":
            head.correlation_logits.copy_(torch.randn(C, C))
    perm = torch.tensor([3, 0, 4, 1, 2])
    other = make_head(name, correlation_source=source)
    other.load_state_dict(permuted_state(head.state_dict(), perm))
    x = fmap()
    for mode in ("eval", "train"):
        getattr(head, mode)(), getattr(other, mode)()
        a, b = head(x), other(x)
        torch.testing.assert_close(b.logits, a.logits[:, perm])
        torch.testing.assert_close(b.extras["attention"], a.extras["attention"][:, perm])
        torch.testing.assert_close(b.extras["label_features"], a.extras["label_features"][:, perm])
        torch.testing.assert_close(b.extras["label_attention"], a.extras["label_attention"][:, perm][:, :, perm])
        torch.testing.assert_close(b.extras["correlation"], a.extras["correlation"][perm][:, perm])
    torch.testing.assert_close(other.attention_ema, head.attention_ema[perm][:, perm])


# ------------------------------------------------------------------------------------------------ losses

def outputs(feats: torch.Tensor, g: torch.Tensor) -> Output:
    return Output(torch.zeros(feats.shape[:2], dtype=feats.dtype), {"label_features": feats, "correlation": g})


def hand_supcon(z, g, target, mask, tau):
    """Explicit loops over anchors / positives / candidates, plain python math."""
    b, c = len(target), len(target[0])
    unit = [[[v / math.sqrt(sum(u * u for u in z[i][k])) for v in z[i][k]] for k in range(c)] for i in range(b)]
    members = [(i, k) for i in range(b) for k in range(c) if target[i][k] == 1 and mask[i][k] == 1]

    def dot(p, q):
        return sum(x * y for x, y in zip(unit[p[0]][p[1]], unit[q[0]][q[1]]))

    losses = []
    for anchor in members:
        i, k = anchor
        partners = [(j, kk) for (j, kk) in members if kk == k and j != i]
        if not partners:
            continue
        denom = 0.0
        for cand in members:
            if cand == anchor:
                continue
            omega = 1.0 if cand[1] == k else 1.0 - g[k][cand[1]]
            denom += omega * math.exp(dot(anchor, cand) / tau)
        losses.append(-sum(math.log(math.exp(dot(anchor, p) / tau) / denom) for p in partners) / len(partners))
    return sum(losses) / len(losses) if losses else 0.0


def test_supcon_matches_hand_computation():
    z = [[[1.0, 0.2], [0.3, 1.0], [-0.5, 0.4]],
         [[0.9, -0.1], [0.2, 0.8], [-1.0, 0.3]],
         [[0.7, 0.6], [0.1, 1.2], [-0.2, -0.9]]]
    g = [[0.6, 0.3, 0.1], [0.25, 0.5, 0.25], [0.05, 0.15, 0.8]]
    target = [[1, 1, 0], [1, 1, 1], [1, 0, 1]]
    mask = [[1, 1, 1], [1, 1, 1], [0, 1, 1]]  # image 2's label 0 is unknown: neither anchor nor candidate
    expected = hand_supcon(z, g, target, mask, 0.1)
    assert expected > 0
    term = LCLSupCon(ctx(3), projection=0)
    batch = {"target": torch.tensor(target, dtype=torch.float64), "mask": torch.tensor(mask, dtype=torch.float64)}
    value = term(outputs(torch.tensor(z, dtype=torch.float64), torch.tensor(g, dtype=torch.float64)), batch)
    assert value.item() == pytest.approx(expected, rel=1e-10)
    # a different temperature and a G that zeroes one candidate weight (ω = 0 drops it)
    g2 = [[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.2, 0.6]]
    term2 = LCLSupCon(ctx(3), projection=0, temperature=0.5)
    value2 = term2(outputs(torch.tensor(z, dtype=torch.float64), torch.tensor(g2, dtype=torch.float64)), batch)
    assert value2.item() == pytest.approx(hand_supcon(z, g2, target, mask, 0.5), rel=1e-10)


@pytest.mark.parametrize("target", [[[0, 0, 0], [0, 0, 0], [0, 0, 0]],   # no positive at all
                                    [[1, 0, 0], [0, 1, 0], [0, 0, 1]]])  # positives but no partner
def test_supcon_without_anchor_is_zero_with_finite_gradient(target):
    feats = torch.randn(3, 3, 4, requires_grad=True)
    term = LCLSupCon(ctx(3), in_dim=4, projection=4)
    value = term(outputs(feats, torch.full((3, 3), 1 / 3)), {"target": torch.tensor(target, dtype=torch.float32),
                                                               "mask": torch.ones(3, 3)})
    assert value.item() == 0.0
    value.backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()


def test_consistency_is_zero_when_local_equals_global():
    v = torch.randn(1, C, 8).expand(4, C, 8).clone()
    z = torch.nn.functional.normalize(v[0], dim=-1)
    s = (z @ z.T).abs()
    g = s / s.sum(-1, keepdim=True)
    for form in ("frobenius", "kl"):
        value = LCLConsistency(ctx(), form=form)(outputs(v, g), {"target": torch.zeros(4, C)})
        assert abs(value.item()) < 1e-6
    value = LCLConsistency(ctx())(outputs(v, torch.full((C, C), 1 / C)), {"target": torch.zeros(4, C)})
    assert value.item() > 1e-3


def test_consistency_supervised_dice_ignores_unknown_labels():
    torch.manual_seed(0)
    v, g = torch.randn(2, 4, 6), torch.softmax(torch.randn(4, 4), -1)
    target = torch.tensor([[1.0, 1, 0, 0], [0, 1, 1, 0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 1]])
    term = LCLConsistency(ctx(4), supervised=True)
    plain = LCLConsistency(ctx(4))(outputs(v, g), {"target": target, "mask": mask})
    value = term(outputs(v, g), {"target": target, "mask": mask})
    assert value.item() > plain.item()
    flipped = target.clone()
    flipped[mask == 0] = 1 - flipped[mask == 0]
    assert term(outputs(v, g), {"target": flipped, "mask": mask}).item() == pytest.approx(value.item())
    # the hand value for image 0: known labels {0, 1, 2}, off-diagonal pairs, y yᵀ = 1 only on (0,1),(1,0)
    z = torch.nn.functional.normalize(v, dim=-1)
    s = (z @ z.transpose(1, 2)).abs()
    dice = []
    for i, known in enumerate([(0, 1, 2), (0, 1, 3)]):
        pairs = [(a, b) for a in known for b in known if a != b]
        inter = sum(float(s[i, a, b]) * float(target[i, a] * target[i, b]) for a, b in pairs)
        total = sum(float(s[i, a, b]) + float(target[i, a] * target[i, b]) for a, b in pairs)
        dice.append(1 - (2 * inter + 1) / (total + 1))
    assert value.item() - plain.item() == pytest.approx(sum(dice) / 2, rel=1e-5)


def test_losses_need_a_label_level_head():
    out = Output(torch.zeros(2, C), {"features": torch.zeros(2, 8)})
    batch = {"target": torch.zeros(2, C), "mask": torch.ones(2, C)}
    for term in (LCLConsistency(ctx()), LCLSupCon(ctx())):
        with pytest.raises(CxrlabError, match="needs head lcl or label_query"):
            term(out, batch)
    with pytest.raises(CxrlabError, match="in_dim"):
        LCLSupCon(ctx(), in_dim=32)(outputs(torch.randn(2, C, 16), torch.eye(C)), batch)


def test_gradcheck_losses_float64():
    torch.manual_seed(0)
    feats = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    g = torch.softmax(torch.randn(3, 3, dtype=torch.float64), -1).requires_grad_()
    batch = {"target": torch.tensor([[1.0, 1, 0], [1, 0, 1], [1, 1, 1]], dtype=torch.float64),
             "mask": torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.float64)}
    for args in ({"form": "frobenius", "detach_g": False}, {"form": "kl", "detach_g": False},
                 {"supervised": True, "detach_g": False}):
        term = LCLConsistency(ctx(3), **args)
        assert torch.autograd.gradcheck(lambda f, gg: term(outputs(f, gg), batch), (feats, g))
    LCLConsistency(ctx(3))(outputs(feats, g), batch).backward()  # detach_g (default): no gradient into G
    assert g.grad is None and feats.grad is not None
    supcon = LCLSupCon(ctx(3), in_dim=4, projection=3).double()
    assert torch.autograd.gradcheck(lambda f: supcon(outputs(f, g.detach()), batch), (feats,))
    assert torch.autograd.gradcheck(lambda f: LCLSupCon(ctx(3), projection=0)(outputs(f, g.detach()), batch), (feats,))


def test_objective_with_lcl_terms_and_optimizer_groups():
    from cxrlab.engine.optim import param_groups

    head = make_head("lcl")
    spec = {"bce": 1.0, "lcl_consistency": 0.1, "lcl_supcon": {"weight": 0.1, "in_dim": DIM, "projection": 8}}
    objective = Objective(spec, ctx())
    batch = {"target": (torch.rand(3, C) < 0.6).float(), "mask": torch.ones(3, C)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, logs = objective(head(fmap()), batch)
    assert math.isfinite(logs["loss"]) and set(logs) == {"bce", "lcl_consistency", "lcl_supcon", "loss"}
    total.backward()
    names = [g["name"] for g in param_groups([head], objective, 1e-3, 1e-4)]
    assert "loss.lcl_supcon" in names
    assert {"lcl", "label_query"} <= set(HEADS.names()) and {"lcl_consistency", "lcl_supcon"} <= set(LOSSES.names())


# ------------------------------------------------------------------------------------------------ learning

def _patterns() -> torch.Tensor:
    """Four 8×8 textures: horizontal stripes, vertical stripes, checkerboard, a ring."""
    r, c = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    ring = ((r - 3.5).abs().maximum((c - 3.5).abs()) > 2.5)
    return torch.stack([(r // 2 % 2 == 0), (c // 2 % 2 == 0), ((r // 2 + c // 2) % 2 == 0), ring]).float()


def synthetic(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """4 labels drawn as distinct 8×8 textures in random quadrants of a 32 px noise image; label 1 follows
    label 0 and label 3 follows label 2 in 90 % of images (strong co-occurrence)."""
    u = torch.rand(n, 4, generator=generator)
    y = torch.zeros(n, 4)
    y[:, 0] = (u[:, 0] < 0.4).float()
    y[:, 1] = torch.where(u[:, 1] < 0.9, y[:, 0], 1 - y[:, 0])
    y[:, 2] = (u[:, 2] < 0.4).float()
    y[:, 3] = torch.where(u[:, 3] < 0.9, y[:, 2], 1 - y[:, 2])
    x = 0.3 * torch.rand(n, 1, 32, 32, generator=generator)
    corners = [(4, 4), (4, 20), (20, 4), (20, 20)]
    patterns = _patterns()
    for i in range(n):
        places = torch.randperm(4, generator=generator)
        for c in range(4):
            if y[i, c]:
                r, q = corners[int(places[c])]
                x[i, 0, r:r + 8, q:q + 8] += 0.6 * patterns[c]
    return x, y


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_learns_synthetic_cooccurring_labels(name):
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
    model = CxrModel(backbone, HEADS.get(name)(32, 4, dim=32, num_heads=4))
    x_train, y_train = synthetic(512, g)
    x_test, y_test = synthetic(256, g)
    objective = Objective({"bce": 1.0, "lcl_consistency": 0.1,
                           "lcl_supcon": {"weight": 0.1, "in_dim": 32, "projection": 16}},
                          LossContext.from_targets(tuple("abcd"), y_train.numpy(), np.ones((512, 4))))
    opt = torch.optim.AdamW(list(model.parameters()) + list(objective.parameters()), lr=3e-3)
    losses = []
    model.train()
    for step in range(100):
        idx = torch.randint(0, 512, (32,), generator=g)
        loss, logs = objective(model(x_train[idx]), {"target": y_train[idx], "mask": torch.ones(32, 4)})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(logs["bce"])
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    model.eval()
    with torch.no_grad():
        out = model(x_test)
    prob = torch.sigmoid(out.logits).numpy()
    auc = np.mean([roc_auc_score(y_test[:, c].numpy(), prob[:, c]) for c in range(4)])
    assert auc > 0.7
    g_final = out.extras["correlation"]
    torch.testing.assert_close(g_final.sum(-1), torch.ones(4))


# ----------------------------------------------------------------------------------------- diagnostics

def test_epoch_stats_measure_collapse_and_focus_by_hand():
    head = make_head("lcl", correlation_source="learned")
    with torch.no_grad():
        head.correlation_logits.zero_()                       # uniform G: no collapse
    stats = head.epoch_stats()
    assert stats["g_row_entropy"] == pytest.approx(1.0) and stats["g_top_label_share"] == pytest.approx(1 / C)
    assert "attention_entropy" not in stats                   # no training batch seen yet
    with torch.no_grad():
        head.correlation_logits.fill_(-30.0)
        head.correlation_logits[:, 2] = 30.0                  # every label attends to label 2: collapse
    stats = head.epoch_stats()
    assert stats["g_row_entropy"] == pytest.approx(0.0, abs=1e-6) and stats["g_top_label_share"] == pytest.approx(1.0)
    head.train()
    with torch.no_grad():
        head.spatial_weight.zero_()                           # uniform maps: entropy log(hw) -> 1
    head(fmap())
    assert head.epoch_stats()["attention_entropy"] == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        head.spatial_weight.fill_(50.0)
    x = torch.zeros(2, D, 3, 4)
    x[:, :, 1, 2] = 1.0                                       # one hot cell: maps put all weight there
    head(x)
    assert head.epoch_stats()["attention_entropy"] == pytest.approx(0.0, abs=1e-4)
    head.eval()
    head(fmap())                                              # evaluation batches are not counted
    assert "attention_entropy" not in head.epoch_stats()
