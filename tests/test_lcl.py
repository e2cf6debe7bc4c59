"""LCL heads (lcl, label_query) and losses (lcl_consistency, lcl_supcon, lcl_branches): the spec's tests
that matter, and the GL-MLL-style design choices (global branch, classifier-tied maps, distinct tokens)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cxrlab.errors import CxrlabError
from cxrlab.losses.base import LossContext, Objective
from cxrlab.losses.lcl import LCLBranches, LCLConsistency, LCLSupCon
from cxrlab.models import CxrModel
from cxrlab.output import Output
from cxrlab.registry import HEADS, LOSSES

C, D, DIM = 5, 12, 16
HEAD_NAMES = ("lcl", "label_query")
# the design before GL-MLL's choices: reachable by head_args, and what old checkpoints were trained with
OLD_LCL = dict(global_branch=False, spatial_source="learned", label_embed_std=0.02, token_norm=False)


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
    if name == "lcl":  # global branch on by default
        assert ex["global_logits"].shape == ex["label_logits"].shape == (3, C)
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
             "cls_bias": (0,), "attention_ema": (0, 1), "cooccurrence": (0, 1), "correlation_logits": (0, 1),
             "global_fc.weight": (0,), "global_fc.bias": (0,)}


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


@pytest.mark.parametrize("name,source,args", [("lcl", "attention", {}), ("label_query", "attention", {}),
                                             ("lcl", "learned", {}), ("lcl", "attention", OLD_LCL),
                                             ("label_query", "attention", {"global_branch": True})])
def test_permuting_labels_permutes_every_output(name, source, args):
    head = make_head(name, correlation_source=source, **args)
    with torch.no_grad():  # non-trivial G state and learned correlation
        head.attention_ema.copy_(torch.softmax(torch.randn(C, C), -1))
        if source == "learned":
            head.correlation_logits.copy_(torch.randn(C, C))
    perm = torch.tensor([3, 0, 4, 1, 2])
    other = make_head(name, correlation_source=source, **args)
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
        for key in ("global_logits", "label_logits"):
            if key in a.extras:
                torch.testing.assert_close(b.extras[key], a.extras[key][:, perm])
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
        with pytest.raises(CxrlabError, match="needs.*label_features"):
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
    spec = {"lcl_branches": {"base": "bce"}, "lcl_consistency": 0.1,
            "lcl_supcon": {"weight": 0.1, "in_dim": DIM, "projection": 8}}
    objective = Objective(spec, ctx())
    batch = {"target": (torch.rand(3, C) < 0.6).float(), "mask": torch.ones(3, C)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, logs = objective(head(fmap()), batch)
    assert math.isfinite(logs["loss"]) and set(logs) == {"lcl_branches", "lcl_consistency", "lcl_supcon", "loss"}
    total.backward()
    names = [g["name"] for g in param_groups([head], objective, 1e-3, 1e-4)]
    assert "loss.lcl_supcon" in names
    assert {"lcl", "label_query"} <= set(HEADS.names())
    assert {"lcl_consistency", "lcl_supcon", "lcl_branches"} <= set(LOSSES.names())


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


@pytest.mark.parametrize("name,args", [("lcl", {}), ("lcl", OLD_LCL), ("label_query", {})],
                         ids=["lcl", "lcl-old-design", "label_query"])
def test_learns_synthetic_cooccurring_labels(name, args):
    """The default heads (GL-MLL design for lcl, trained on both branches) and the earlier design learn
    a tiny task with co-occurring labels: the training loss falls and the test macro AUC is far above 0.5."""
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
    model = CxrModel(backbone, HEADS.get(name)(32, 4, dim=32, num_heads=4, **args))
    x_train, y_train = synthetic(512, g)
    x_test, y_test = synthetic(256, g)
    classification = "lcl_branches" if "global_logits" in model(x_train[:2]).extras else "bce"
    objective = Objective({classification: {"base": "bce"} if classification == "lcl_branches" else 1.0,
                           "lcl_consistency": 0.1, "lcl_supcon": {"weight": 0.1, "in_dim": 32, "projection": 16}},
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
        losses.append(logs[classification])
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
    head = make_head("lcl", correlation_source="learned", spatial_source="learned")
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
    stats = head.epoch_stats()
    assert "attention_entropy" not in stats and "token_cosine" not in stats


# ------------------------------------------------------------------------------------ GL-MLL design

@pytest.mark.parametrize("name", HEAD_NAMES)
def test_global_branch_logits_are_the_mean_of_the_two_branches(name):
    head = make_head(name, global_branch=True)
    x = fmap()
    out = head(x)
    ex = out.extras
    assert torch.equal(out.logits, (ex["global_logits"] + ex["label_logits"]) / 2)
    # each branch by hand: fc(GAP F), and the group-wise classifier on the label features
    pooled = x.mean(dim=(2, 3))
    torch.testing.assert_close(ex["global_logits"], pooled @ head.global_fc.weight.T + head.global_fc.bias)
    by_label = torch.stack([ex["label_features"][:, c] @ head.cls_weight[c] + head.cls_bias[c] for c in range(C)], 1)
    torch.testing.assert_close(ex["label_logits"], by_label)
    # without it, the logits are the label branch alone and no branch extras exist
    plain = make_head(name, **(OLD_LCL if name == "lcl" else {"global_branch": False}))
    out = plain(x)
    assert "global_logits" not in out.extras and plain.global_fc is None
    by_label = torch.stack([out.extras["label_features"][:, c] @ plain.cls_weight[c] + plain.cls_bias[c]
                            for c in range(C)], 1)
    torch.testing.assert_close(out.logits, by_label)


def _hand_bce(logits, target, mask, pos_weight):
    """Mean over known entries of −(w_c·y·log σ(x) + (1 − y)·log(1 − σ(x))), plain python."""
    terms = []
    for i, row in enumerate(logits):
        for c, x in enumerate(row):
            if mask[i][c]:
                p = 1 / (1 + math.exp(-x))
                terms.append(-(pos_weight[c] * target[i][c] * math.log(p) + (1 - target[i][c]) * math.log(1 - p)))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("base", ["bce", "weighted_bce"])
def test_lcl_branches_is_the_base_loss_on_each_branch_summed(base):
    head = make_head("lcl")
    x = fmap()
    target = torch.tensor([[1.0, 0, 0, 1, 0], [0, 1, 0, 0, 0], [1, 1, 0, 0, 1]])
    mask = torch.tensor([[1.0, 1, 0, 1, 1], [1, 1, 1, 1, 0], [1, 0, 1, 1, 1]])
    # training counts: label c has c + 1 positives and 9 − c negatives -> weights (9 − c)/(c + 1)
    train_target = np.array([[1.0 if i <= c else 0.0 for c in range(C)] for i in range(10)])
    context = LossContext.from_targets(tuple(f"l{i}" for i in range(C)), train_target, np.ones((10, C)))
    term = LCLBranches(context, base=base)
    out = head(x)
    value = term(out, {"target": target, "mask": mask})
    pos_weight = [(9 - c) / (c + 1) for c in range(C)] if base == "weighted_bce" else [1.0] * C
    expected = sum(_hand_bce(out.extras[k].tolist(), target.tolist(), mask.tolist(), pos_weight)
                   for k in ("global_logits", "label_logits"))
    assert value.item() == pytest.approx(expected, rel=1e-5)
    flipped = target.clone()
    flipped[mask == 0] = 1 - flipped[mask == 0]  # unknown labels never count
    assert term(out, {"target": flipped, "mask": mask}).item() == pytest.approx(value.item())
    value.backward()  # both branches get a gradient
    for p in (head.global_fc.weight, head.cls_weight, head.project.weight, head.correlation_block.label_embed):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_lcl_branches_refuses_a_head_without_branches_and_unknown_bases():
    out = make_head("lcl", **OLD_LCL)(fmap())
    with pytest.raises(CxrlabError, match="global_branch: true.*'global_logits', 'label_logits'"):
        LCLBranches(ctx())(out, {"target": torch.zeros(3, C), "mask": torch.ones(3, C)})
    with pytest.raises(CxrlabError, match="did you mean 'weighted_bce'"):
        LCLBranches(ctx(), base="weighted_bc")


def test_classifier_tied_maps_are_the_softmax_of_the_classifier_cam():
    head = make_head("lcl", temperature=2.0)
    assert head.spatial_source == "classifier" and not hasattr(head, "spatial_weight")
    assert head.log_temperature.exp().item() == pytest.approx(2.0)
    x = fmap()
    w, b = head.global_fc.weight, head.global_fc.bias
    for tau in (2.0, 0.5):
        with torch.no_grad():
            head.log_temperature.fill_(math.log(tau))
        maps = head(x).extras["attention"]
        torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(3, C))
        cam = torch.einsum("cd,bdhw->bchw", w, x) + b[None, :, None, None]
        expected = torch.softmax(cam.flatten(2) / tau, dim=-1).reshape(3, C, 3, 4)
        torch.testing.assert_close(maps, expected)
    head(x).logits.sum().backward()  # the temperature is learned
    assert head.log_temperature.grad is not None and head.log_temperature.grad != 0
    with pytest.raises(CxrlabError, match="global_branch: true"):
        make_head("lcl", global_branch=False)
    with pytest.raises(CxrlabError, match="did you mean 'classifier'"):
        make_head("lcl", spatial_source="clasifier")
    with pytest.raises(CxrlabError, match="temperature"):
        make_head("lcl", temperature=0.0)


def test_mean_pairwise_cosine_by_hand():
    from cxrlab.models.heads.lcl import mean_pairwise_cosine

    tokens = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]],     # cosines 0, 1/√2, 1/√2
                           [[1.0, 0.0], [3.0, 0.0], [-1.0, 0.0]]])   # cosines 1, −1, −1
    expected = ((0 + 2 / math.sqrt(2)) / 3 + (1 - 1 - 1) / 3) / 2
    assert mean_pairwise_cosine(tokens).item() == pytest.approx(expected)
    # the diagnostic reads the tokens entering the correlation block: zero content + orthogonal embeddings
    head = make_head("lcl", **OLD_LCL).train()
    with torch.no_grad():
        head.project.weight.zero_()
        head.project.bias.zero_()
        head.correlation_block.label_embed.copy_(torch.eye(C, DIM))
    head(fmap())
    assert head.epoch_stats()["token_cosine"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        head.correlation_block.label_embed.copy_(torch.ones(C, DIM))  # every token the same vector
    head(fmap())
    head(fmap(seed=2))
    assert head.epoch_stats()["token_cosine"] == pytest.approx(1.0)


def _init_stats(head_args: dict, seed: int = 0) -> dict:
    """token_cosine and attention_entropy at initialisation: test_resnet at 64 px, output stride 8 (8×8
    maps), 14 labels, one training-mode batch of 8 random images."""
    from cxrlab.models import build_model

    torch.manual_seed(seed)
    model = build_model("test_resnet", "lcl", 14, head_args={"dim": 128, "num_heads": 4, **head_args},
                        output_stride=8).train()
    images = torch.rand(8, 1, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert model(images).extras["attention"].shape[-2:] == (8, 8)
    return model.head.epoch_stats()


def test_label_tokens_are_distinct_at_init_with_the_new_defaults():
    new, old = _init_stats({}), _init_stats(OLD_LCL)
    assert old["token_cosine"] > 0.99  # the earlier design: 14 near-copies of one vector
    assert new["token_cosine"] < 0.9
    # the embeddings' scale is what separates the tokens; the LayerNorm only balances content against them
    assert _init_stats({"token_norm": False})["token_cosine"] < 0.9
    assert _init_stats({"label_embed_std": 0.02})["token_cosine"] > 0.9
    assert new["attention_entropy"] < old["attention_entropy"]  # classifier-tied maps start less uniform


def test_head_sizing_args():
    head = HEADS.get("lcl")(96, 14, dim=128, num_heads=4, layers=2, mlp_ratio=2.0, dropout=0.1)
    assert head.project.out_features == 128 and len(head.correlation_block.blocks) == 2
    mlp = head.correlation_block.blocks[0].mlp
    assert mlp[0].out_features == 256 and mlp[2].p == 0.1
    assert head(torch.randn(2, 96, 4, 4)).extras["label_features"].shape == (2, 14, 128)
    with pytest.raises(CxrlabError, match="num_heads"):
        HEADS.get("lcl")(96, 14, dim=130, num_heads=4)
    with pytest.raises(CxrlabError, match="dropout"):
        HEADS.get("lcl")(96, 14, dim=128, num_heads=4, dropout=1.0)
    with pytest.raises(CxrlabError, match="label_embed_std"):
        HEADS.get("label_query")(96, 14, dim=128, num_heads=4, label_embed_std=0.0)


def test_old_checkpoints_load_with_the_design_they_were_trained_with(tmp_path):
    """A checkpoint saved before the new options existed records head_args without them; load_model
    reads the design off its weight names instead of building the new defaults."""
    from cxrlab.checkpoint import load_model, save_checkpoint
    from cxrlab.models import build_model

    labels = [f"l{i}" for i in range(C)]
    x = torch.rand(2, 1, 32, 32)
    recorded = {"dim": DIM, "num_heads": 2}  # what an old recipe said: nothing about the new options
    cases = [("old", OLD_LCL, "learned", False), ("new", {}, "classifier", True),
             ("explicit", {"global_branch": True, "spatial_source": "learned"}, "learned", True)]
    for tag, args, spatial, branch in cases:
        torch.manual_seed(0)
        model = build_model("test_resnet", "lcl", C, head_args={**recorded, **args}).eval()
        saved_args = {**recorded, **args} if tag == "explicit" else recorded
        info = {"recipe": {"model": {"backbone": "test_resnet", "head": "lcl", "head_args": saved_args},
                           "data": {"image_size": 32}}, "labels": labels}
        weights = {f"model.{k}": v for k, v in model.state_dict().items()}
        save_checkpoint(tmp_path / tag, weights, {}, {}, info)
        loaded, _ = load_model(tmp_path / tag)
        assert loaded.head.spatial_source == spatial and (loaded.head.global_fc is not None) == branch
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, model(x).logits)
    from cxrlab.models.heads.lcl import LabelQueryHead, LCLHead

    assert LCLHead.args_for_weights({"token_norm": True}, ["spatial_weight"]) == {
        "token_norm": True, "global_branch": False, "spatial_source": "learned"}  # a recipe's own value wins
    assert LabelQueryHead.args_for_weights({}, ["global_fc.weight", "queries"]) == {
        "global_branch": True, "token_norm": False}
