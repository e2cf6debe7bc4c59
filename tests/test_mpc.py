"""MPC (Xiao et al., IEEE TMI 2024): the regime's pseudo-labels, its switches, its loss terms, and a
small synthetic SPML task on which MPC must recover hidden positives."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cxrlab.errors import CxrlabError
from cxrlab.losses.base import LossContext, Objective
from cxrlab.models import CxrModel
from cxrlab.models.heads.linear import LinearHead
from cxrlab.output import Output
from cxrlab.registry import LOSSES, REGIMES
from cxrlab.regimes.base import Supervised
from cxrlab.regimes.mpc import MPC

C = 3


def ctx(c: int = C) -> LossContext:
    return LossContext(tuple("abcdefgh"[:c]), 8, np.ones(c), np.ones(c), np.eye(c), 1.5)


def brightness_model(dim: int = 4) -> CxrModel:
    """Features = the image copied to ``dim`` channels; logits = 10·mean(image) − 5 for every label:
    a bright image gives q = σ(5) ≈ 0.993, a black one q = σ(−5) ≈ 0.007."""
    backbone = nn.Conv2d(1, dim, 1)
    head = LinearHead(dim, C)
    with torch.no_grad():
        backbone.weight.fill_(1.0)
        backbone.bias.zero_()
        head.fc.weight.fill_(10.0 / dim)
        head.fc.bias.fill_(-5.0)
    return CxrModel(backbone, head)


def spml_batch(image_value: float = 1.0, b: int = 2):
    target = torch.zeros(b, C)
    target[torch.arange(b), torch.arange(b) % C] = 1.0
    return {"image": torch.full((b, 1, 4, 4), image_value), "target": target, "mask": target.clone(),
            "index": torch.arange(b)}


class Recorder:
    def __init__(self, fn=lambda x: x):
        self.fn, self.seen = fn, []

    def __call__(self, x):
        self.seen.append(x.clone())
        return self.fn(x)


def regime(weak=lambda x: x, strong=lambda x: x, **args) -> MPC:
    args.setdefault("feature_dim", 4)
    return MPC(weak, strong, **args)


# ------------------------------------------------------------------------------------ pseudo-labels

@pytest.mark.parametrize("fpc", [True, False])
def test_pseudo_labels_come_from_the_weak_view_without_gradient(fpc):
    weak, strong = Recorder(), Recorder(lambda x: torch.zeros_like(x))  # the strong view is black
    batch = spml_batch(1.0)
    out = regime(weak, strong, fpc=fpc).step(brightness_model(), batch)
    assert len(weak.seen) == 1 and len(strong.seen) == 1
    assert torch.equal(weak.seen[0], batch["image"]) and torch.equal(strong.seen[0], batch["image"])
    unknown = batch["mask"] == 0
    # weak view bright -> every unknown pseudo-positive; the strong view would have said negative
    assert (out.extras["weak_logits"] > 4).all() and (out.extras["strong_logits"] < -4).all()
    # the observed-label loss scores the weak view (with gradient); pseudo-labels are its detached copy
    assert torch.equal(out.logits.detach(), out.extras["weak_logits"])
    assert (out.extras["pseudo_target"][unknown] == 1).all() and (out.extras["pseudo_mask"] == 1).all()
    for key in ("pseudo_target", "pseudo_mask", "weak_logits"):
        assert not out.extras[key].requires_grad, key
    assert out.logits.requires_grad and out.extras["strong_logits"].requires_grad
    assert out.extras["btc_logits"].requires_grad
    assert out.extras["fpc_logits"].requires_grad if fpc else "fpc_logits" not in out.extras


def test_observed_positive_is_never_overwritten():
    batch = spml_batch(0.0)  # black images: q ≈ 0.007 everywhere, below tau_neg
    out = regime().step(brightness_model(), batch)
    known = batch["mask"] == 1
    assert (out.extras["pseudo_target"][known] == 1).all()
    assert (out.extras["pseudo_target"][~known] == 0).all() and (out.extras["pseudo_mask"] == 1).all()
    # the loss terms re-apply the observed label even if an extra claims otherwise
    logits = torch.tensor([[0.3, -0.2, 0.1], [1.0, 0.4, -0.7]])
    forged = Output(logits.clone(), {"pseudo_target": torch.zeros(2, C), "pseudo_mask": torch.ones(2, C),
                                     "btc_logits": logits.clone(), "fpc_logits": logits.clone(),
                                     "strong_logits": logits.clone()})
    btc = LOSSES.get("mpc_btc")(ctx())(forged, batch)
    expected = nn.functional.binary_cross_entropy_with_logits(logits, batch["target"])
    assert float(btc) == pytest.approx(float(expected), rel=1e-6)
    ipc = LOSSES.get("mpc_ipc")(ctx(), reduction="selected")(forged, batch)
    on_unknown = nn.functional.binary_cross_entropy_with_logits(logits[batch["mask"] == 0], torch.zeros(4))
    assert float(ipc) == pytest.approx(float(on_unknown), rel=1e-6)


def test_thresholds_out_of_reach_make_ipc_and_fpc_zero():
    objective = Objective({"spml_observed": 1.0, "mpc_ipc": 1.0, "mpc_fpc": 1.0, "mpc_btc": 1.0}, ctx())
    model = brightness_model()
    for value in (0.0, 1.0):
        batch = spml_batch(value)
        out = regime(tau_pos=1.01, tau_neg=-0.01).step(model, batch)
        assert (out.extras["pseudo_mask"][batch["mask"] == 0] == 0).all()
        total, logs = objective(out, batch)
        assert logs["mpc_ipc"] == 0.0 and logs["mpc_fpc"] == 0.0
        for reduction in ("selected", "all"):
            assert float(LOSSES.get("mpc_ipc")(ctx(), reduction=reduction)(out, batch).detach()) == 0.0
        # BTC is then supervised by the observed positives only
        btc = out.extras["btc_logits"].detach()[batch["mask"] == 1]
        assert logs["mpc_btc"] == pytest.approx(float(-nn.functional.logsigmoid(btc).mean()), rel=1e-5)


def test_ipc_by_hand():
    # unknown entries: 4; pseudo-labelled: (0,1) positive, (1,2) negative
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 1.5]])
    batch = spml_batch(1.0)
    extras = {"pseudo_target": torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]),
              "pseudo_mask": torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])}
    out = Output(-logits, {**extras, "strong_logits": logits})  # IPC scores the strong view, not .logits
    parts = [-math.log(1 / (1 + math.exp(1.0))), -math.log(1 - 1 / (1 + math.exp(-1.5)))]
    assert float(LOSSES.get("mpc_ipc")(ctx())(out, batch)) == pytest.approx(sum(parts) / 4, rel=1e-6)
    assert float(LOSSES.get("mpc_ipc")(ctx(), reduction="selected")(out, batch)) == pytest.approx(sum(parts) / 2)


def test_spml_observed_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 1.5]])
    batch = spml_batch(1.0)
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  softplus: −log(1 − σ(x))
    pos = (sp(-2.0) + sp(0.0)) / 2
    term = LOSSES.get("spml_observed")
    assert float(term(ctx())(Output(logits), batch)) == pytest.approx(pos, rel=1e-6)
    neg = (sp(-1.0) + sp(0.5) + sp(-3.0) + sp(1.5)) / 4
    assert float(term(ctx(), neg_weight=0.5)(Output(logits), batch)) == pytest.approx(pos + 0.5 * neg, rel=1e-6)
    # entries the regime pseudo-labelled positive are spared from the assume-negative term
    extras = {"pseudo_target": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), "pseudo_mask": torch.ones(2, C)}
    spared = (sp(-1.0) + sp(-3.0) + sp(1.5)) / 3
    assert float(term(ctx(), neg_weight=1.0)(Output(logits, extras), batch)) == pytest.approx(pos + spared, rel=1e-6)
    assert float(term(ctx(), neg_weight=1.0, spare_pseudo_pos=False)(Output(logits, extras), batch)) == \
        pytest.approx(pos + neg, rel=1e-6)


# ----------------------------------------------------------------------------------- switches, BTC

def test_switches_remove_their_extras_and_modules():
    batch = spml_batch(1.0)
    out = regime(fpc=False, btc=False, feature_dim=None).step(brightness_model(), batch)
    assert "fpc_logits" not in out.extras and "btc_logits" not in out.extras
    assert len(regime(btc=False).modules) == 0
    with pytest.raises(CxrlabError, match="fpc"):
        LOSSES.get("mpc_fpc")(ctx())(out, batch)
    with pytest.raises(CxrlabError, match="btc"):
        LOSSES.get("mpc_btc")(ctx())(out, batch)


def test_missing_extras_name_the_regime():
    batch = spml_batch(1.0)
    out = Supervised(lambda x: x, lambda x: x).step(brightness_model(), batch)
    for name in ("mpc_ipc", "mpc_fpc", "mpc_btc"):
        with pytest.raises(CxrlabError, match="regime: mpc"):
            LOSSES.get(name)(ctx())(out, batch)


def test_bad_regime_args():
    with pytest.raises(CxrlabError, match="feature_dim"):
        MPC(lambda x: x, lambda x: x)
    with pytest.raises(CxrlabError, match="btc_heads"):
        MPC(lambda x: x, lambda x: x, feature_dim=6, btc_heads=4)
    with pytest.raises(CxrlabError, match="tau_neg < tau_pos"):
        MPC(lambda x: x, lambda x: x, feature_dim=4, tau_pos=0.3, tau_neg=0.5)
    assert "mpc" in REGIMES
    with pytest.raises(CxrlabError, match="feature_dim"):  # wrong dim caught at the first step
        regime(feature_dim=8).step(brightness_model(), spml_batch())


def test_btc_is_trained_but_never_used_at_inference():
    model = brightness_model()
    keys = set(model.state_dict())
    r = regime()
    objective = Objective({"spml_observed": 1.0, "mpc_btc": 1.0}, ctx())
    loss, _ = objective(r.step(model, spml_batch(0.5, b=4)), spml_batch(0.5, b=4))
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in r.modules["btc"].parameters())
    assert set(model.state_dict()) == keys  # the model gained nothing
    assert not any(p is q for p in model.parameters() for q in r.modules.parameters())

    def boom(*_):
        raise AssertionError("BTC used at inference")

    r.modules["btc"].forward = boom
    model.eval()
    x = torch.rand(3, 1, 4, 4)
    with torch.no_grad():
        assert torch.equal(model(x).logits, model.head(model.features(x)).logits)


def test_btc_shift_makes_the_pooled_feature_the_mixed_token():
    from cxrlab.regimes.mpc import BatchTransformer

    btc = BatchTransformer(8, heads=2, dropout=0.0).eval()
    fmap = torch.randn(5, 8, 3, 3)
    mixed = btc.encoder(fmap.mean((2, 3)).unsqueeze(0)).squeeze(0)
    shifted = btc(fmap)
    assert torch.allclose(shifted.mean((2, 3)), mixed, atol=1e-5)
    assert torch.allclose(shifted - shifted.mean((2, 3), keepdim=True), fmap - fmap.mean((2, 3), keepdim=True),
                          atol=1e-5)  # spatial pattern kept


# ------------------------------------------------------------------------------------- epoch stats

class FixedModel(nn.Module):
    """Returns preset logits whatever the image (to hand-check the pseudo-label statistics)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def features(self, x):
        return x

    def head(self, fmap):
        return Output(self.logits.clone())

    def forward(self, x):
        return self.head(self.features(x))


def test_epoch_stats_by_hand():
    q = torch.tensor([[0.99, 0.97, 0.96, 0.50], [0.01, 0.99, 0.02, 0.98]])
    batch = {"image": torch.zeros(2, 1, 2, 2), "target": torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]),
             "full_target": torch.tensor([[1.0, 1, 0, 1], [0, 1.0, 1, 0]])}
    batch["mask"] = batch["target"].clone()
    r = MPC(lambda x: x, lambda x: x, fpc=False, btc=False)
    model = FixedModel(torch.logit(q))
    for _ in range(2):  # two steps: counts add up, ratios stay
        r.step(model, batch)
    # unknown entries: (0,1) pos ✓  (0,2) pos ✗  (0,3) ignored [hidden +]  (1,0) neg ✓  (1,2) neg ✗ [hidden +]  (1,3) pos ✗
    stats = r.epoch_stats()
    assert stats["pseudo_pos_count"] == 6 and stats["pseudo_neg_count"] == 4
    assert stats["pseudo_pos_precision"] == pytest.approx(1 / 3)
    assert stats["pseudo_pos_recall"] == pytest.approx(1 / 3)  # 1 of the 3 hidden positives
    assert stats["pseudo_neg_precision"] == pytest.approx(0.5)
    assert stats["hidden_pos_rate"] == pytest.approx(0.5)
    assert r.epoch_stats() == {}  # reset
    del batch["full_target"]  # without the withheld labels: counts only
    r.step(model, batch)
    assert r.epoch_stats() == {"pseudo_pos_count": 3.0, "pseudo_neg_count": 2.0}


# ------------------------------------------------------------------------- learning (synthetic SPML)

N_LABELS, N_TRAIN, EPOCHS = 5, 384, 12


def _templates() -> torch.Tensor:
    t = torch.zeros(N_LABELS, 5, 5)
    t[0, 2, :] = 1  # horizontal bar
    t[1, :, 2] = 1  # vertical bar
    t[2] = torch.eye(5)  # diagonal
    t[3] = torch.eye(5).flip(1)  # anti-diagonal
    t[4, 0, :] = t[4, -1, :] = t[4, :, 0] = t[4, :, -1] = 1  # hollow square
    return t


def _images(n: int, g: torch.Generator):
    """16×16 noisy images; each present label (1–4 per image) is its pattern in its own quadrant."""
    templates = _templates()
    y = torch.zeros(n, N_LABELS)
    x = 0.2 * torch.rand(n, 1, 16, 16, generator=g)
    for i in range(n):
        while not 1 <= y[i].sum() <= 4:
            y[i] = (torch.rand(N_LABELS, generator=g) < 0.35).float()
        for quad, c in zip(torch.randperm(4, generator=g).tolist(), y[i].nonzero().flatten().tolist()):
            r0, c0 = (quad // 2) * 8 + int(torch.randint(0, 4, (1,), generator=g)), \
                (quad % 2) * 8 + int(torch.randint(0, 4, (1,), generator=g))
            x[i, 0, r0:r0 + 5, c0:c0 + 5] += 0.8 * templates[c]
    return x.clamp(0, 1), y


class TinyNet(nn.Module):
    num_features = 32

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())

    def forward(self, x):
        return self.net(x)


def _strong(x):
    x = x * (0.8 + 0.4 * torch.rand(x.shape[0], 1, 1, 1)) + 0.1 * torch.randn_like(x)
    shift = torch.randint(-1, 2, (2,)).tolist()
    return torch.roll(x, shift, (2, 3)).clamp(0, 1)


@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(0)
    x, y = _images(N_TRAIN, g)
    x_test, y_test = _images(256, g)
    observed = torch.zeros_like(y)  # one positive kept per image
    for i in range(N_TRAIN):
        pos = y[i].nonzero().flatten()
        observed[i, pos[torch.randint(len(pos), (1,), generator=g)]] = 1.0
    return x, y, observed, x_test, y_test


def _fit(toy, regime, loss: dict) -> tuple[float, list[dict]]:
    from sklearn.metrics import average_precision_score

    x, y, observed, x_test, y_test = toy
    torch.manual_seed(0)
    model = CxrModel(TinyNet(), LinearHead(32, N_LABELS))
    objective = Objective(loss, LossContext.from_targets(tuple("abcde"), observed.numpy(), observed.numpy(),
                                                         y.numpy()))
    opt = torch.optim.Adam(list(model.parameters()) + list(regime.modules.parameters()), lr=3e-3)
    stats = []
    for epoch in range(EPOCHS):
        objective.on_epoch_start(epoch)
        model.train()
        for rows in torch.randperm(N_TRAIN).split(32):
            batch = {"image": x[rows], "target": observed[rows], "mask": observed[rows], "index": rows,
                     "full_target": y[rows]}
            loss_value, _ = objective(regime.step(model, batch), batch)
            opt.zero_grad()
            loss_value.backward()
            opt.step()
        if hasattr(regime, "epoch_stats"):
            stats.append(regime.epoch_stats())
    model.eval()
    with torch.no_grad():
        probs = torch.sigmoid(model(x_test).logits).numpy()
    return float(average_precision_score(y_test.numpy(), probs, average="macro")), stats


def test_mpc_recovers_hidden_positives_on_synthetic_spml(toy):
    an_map, _ = _fit(toy, Supervised(lambda x: x, _strong), {"an": 1.0})
    mpc = MPC(lambda x: x, _strong, tau_pos=0.7, feature_dim=TinyNet.num_features)
    loss = {"spml_observed": {"neg_weight": 1.0}, "mpc_ipc": 1.0, "mpc_fpc": 1.0, "mpc_btc": 1.0}
    mpc_map, stats = _fit(toy, mpc, loss)
    last = stats[-1]
    print(f"\nsynthetic SPML ({N_LABELS} labels, {N_TRAIN} images, {EPOCHS} epochs): AN mAP {an_map:.3f}, "
          f"MPC mAP {mpc_map:.3f}; last epoch pseudo-positives {last['pseudo_pos_count']:.0f}, precision "
          f"{last['pseudo_pos_precision']:.2f} (base rate {last['hidden_pos_rate']:.2f}), recall "
          f"{last['pseudo_pos_recall']:.2f}")
    assert last["pseudo_pos_recall"] > 0.2
    assert last["pseudo_pos_precision"] > 2 * last["hidden_pos_rate"]
    assert mpc_map >= an_map - 0.02


def test_pseudo_positives_never_contradict_an_exclusive_observed_label():
    names = ("a", "b", "No Finding")
    mpc = MPC(lambda x: x, lambda x: x, btc=False, label_names=names)
    logits = torch.full((2, 3), 10.0)  # every entry confidently positive
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # image 0: finding "a"; image 1: No Finding
    pseudo_target, pseudo_mask = mpc.pseudo_labels(logits, target, target.clone())
    assert pseudo_target.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert pseudo_mask.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    # without the exclusive label every unknown entry would have become pseudo-positive
    plain = MPC(lambda x: x, lambda x: x, btc=False, exclusive_label=None, label_names=names)
    assert plain.pseudo_labels(logits, target, target.clone())[0].tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]


def test_support_devices_coexist_with_an_observed_no_finding():
    """CheXpert's "No Finding" allows support devices: an image observed "No Finding" may get a
    pseudo-positive "Support Devices" and vice versa, but no pathology."""
    names = ("a", "Support Devices", "No Finding")
    mpc = MPC(lambda x: x, lambda x: x, btc=False, label_names=names)
    logits = torch.full((2, 3), 10.0)
    target = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # image 0: No Finding; image 1: a device
    pseudo_target, _ = mpc.pseudo_labels(logits, target, target.clone())
    assert pseudo_target.tolist() == [[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    strict = MPC(lambda x: x, lambda x: x, btc=False, coexisting_labels=(), label_names=names)
    assert strict.pseudo_labels(logits, target, target.clone())[0].tolist() == [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]


@pytest.mark.parametrize("term", ["mpc_ipc", "mpc_fpc", "mpc_btc"])
def test_warmup_epochs_switch_a_pseudo_label_term_on_later(term):
    logits = torch.zeros(2, C, requires_grad=True)
    extras = {"pseudo_target": torch.ones(2, C), "pseudo_mask": torch.ones(2, C),
              "strong_logits": logits, "fpc_logits": logits, "btc_logits": logits}
    batch = {"target": torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), "mask": torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])}
    loss = LOSSES.get(term)(ctx(), warmup_epochs=2)
    for epoch, expected_on in ((0, False), (1, False), (2, True), (5, True)):
        loss.on_epoch_start(epoch)
        value = loss(Output(torch.zeros(2, C), extras), batch)
        assert (float(value) > 0) == expected_on, epoch
    value.backward()
    assert logits.grad.abs().sum() > 0
    with pytest.raises(CxrlabError, match="warmup_epochs"):
        LOSSES.get(term)(ctx(), warmup_epochs=-1)


def test_mpc_with_several_backbones_is_refused_before_data_is_prepared():
    from cxrlab.config import load_recipe
    from cxrlab.workflows.experiment import check_parts

    recipe = load_recipe("mpc_synthetic", ["model.backbones=[test_resnet,test_resnet]", "model.head=concat"])
    with pytest.raises(CxrlabError, match="regime 'mpc' works on one backbone's feature map.*lists 2"):
        check_parts(recipe)
    check_parts(load_recipe("mpc_synthetic"))  # one backbone: accepted
