"""MSML (Ge et al. 2018/2020): the msml and corloss losses, the bilinear head and the No Finding output."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cxrlab.errors import CxrlabError
from cxrlab.labels import NO_FINDING, LabelSpace
from cxrlab.losses.base import LossContext, Objective
from cxrlab.output import Output
from cxrlab.registry import HEADS, LOSSES
from fakes import no_plots as _no_plots

NAMES = ("a", "b", "c", NO_FINDING)


def ctx(names=NAMES) -> LossContext:
    return LossContext.from_targets(names, np.zeros((2, len(names))), np.ones((2, len(names))))


def loss(name: str, logits, target, mask=None, names=NAMES, **args) -> torch.Tensor:
    logits = torch.as_tensor(logits, dtype=torch.float32)
    target = torch.as_tensor(target, dtype=torch.float32)
    mask = torch.ones_like(target) if mask is None else torch.as_tensor(mask, dtype=torch.float32)
    return LOSSES.get(name)(ctx(names), **args)(Output(logits), {"target": target, "mask": mask})


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ------------------------------------------------------------------------------------------------ msml

def test_msml_matches_a_hand_computed_case():
    logits = [[2.0, 0.0, -1.0, 1.0], [0.0, 3.0, 1.0, 5.0]]
    target = [[1, 0, 0, 1], [1, 0, 0, 1]]
    mask = [[1, 1, 1, 1], [1, 1, 1, 0]]  # image 2: label 4 unknown, so its only positive is label 1
    lse1 = math.log(math.exp(0.0) + math.exp(-1.0))
    image1 = (softplus(lse1 - 2.0) + softplus(lse1 - 1.0)) / 2  # two positives, each against {0, -1}
    image2 = softplus(math.log(math.exp(3.0) + math.exp(1.0)) - 0.0)
    assert image1 == pytest.approx(0.2887, abs=1e-4)  # the number worked out on paper
    value = loss("msml", logits, target, mask)
    assert value.item() == pytest.approx((image1 + image2) / 2, rel=1e-6)
    # the same thing as a softmax: each positive against the negatives only
    p = math.exp(2.0) / (math.exp(2.0) + math.exp(0.0) + math.exp(-1.0))
    q = math.exp(1.0) / (math.exp(1.0) + math.exp(0.0) + math.exp(-1.0))
    assert image1 == pytest.approx(-(math.log(p) + math.log(q)) / 2, rel=1e-9)


def test_msml_invariant_to_a_constant_added_to_one_image():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g) * 3
    target = (torch.rand(6, 4, generator=g) < 0.4).float()
    target[:, 3] = (target[:, :3].sum(1) == 0).float()
    mask = (torch.rand(6, 4, generator=g) < 0.85).float()
    base = loss("msml", logits, target, mask)
    shifted = logits.clone()
    shifted[2] += 7.5
    shifted[4] -= 3.0
    torch.testing.assert_close(loss("msml", shifted, target, mask), base)


def test_msml_ignores_masked_labels():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 4, generator=g)
    target = (torch.rand(5, 4, generator=g) < 0.5).float()
    mask = torch.ones(5, 4)
    mask[:, 1] = 0
    mask[0, 2] = 0
    other_logits, other_target = logits.clone(), target.clone()
    other_logits[mask == 0] = torch.randn(int((mask == 0).sum()), generator=g) * 10
    other_target[mask == 0] = 1 - other_target[mask == 0]
    torch.testing.assert_close(loss("msml", other_logits, other_target, mask), loss("msml", logits, target, mask))


def test_msml_gradient_pushes_positives_up_and_negatives_down():
    logits = torch.tensor([[0.5, -0.2, 1.0, 0.3], [2.0, 0.1, -1.0, 0.0]], requires_grad=True)
    target = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 1]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 1]])
    loss("msml", logits, target, mask).backward()
    grad = logits.grad
    positive, negative = (target == 1) & (mask == 1), (target == 0) & (mask == 1)
    assert (grad[positive] < 0).all()  # descent raises positive scores
    assert (grad[negative] > 0).all()  # and lowers negative ones
    assert (grad[mask == 0] == 0).all()


def test_msml_images_without_positive_or_negative_contribute_nothing():
    logits = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.3, 0.1, 0.2, 0.4]], requires_grad=True)
    # image 1: all positive (nothing to compete against); image 2: everything unknown
    value = loss("msml", logits, [[1, 1, 1, 1], [0, 0, 0, 0]], [[1, 1, 1, 1], [0, 0, 0, 0]])
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(logits.grad).all() and (logits.grad == 0).all()
    # the mean is over the images that count: adding such images changes nothing
    one = loss("msml", [[2.0, 0.0, -1.0, 1.0]], [[1, 0, 0, 0]])
    two = loss("msml", [[2.0, 0.0, -1.0, 1.0], [1.0, 2.0, 0.0, -1.0]], [[1, 0, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(one, two)


def test_msml_skip_leaves_no_finding_out():
    target = [[0, 0, 0, 1], [1, 0, 0, 0]]
    a = loss("msml", [[0.0, 1.0, 2.0, -5.0], [1.0, 0.0, 0.5, 9.0]], target, healthy="skip")
    b = loss("msml", [[3.0, 1.0, 2.0, 4.0], [1.0, 0.0, 0.5, -9.0]], target, healthy="skip")
    expected = softplus(math.log(math.exp(0.0) + math.exp(0.5)) - 1.0)  # healthy image skipped
    assert a.item() == pytest.approx(expected, rel=1e-6) and b.item() == pytest.approx(expected, rel=1e-6)
    # without a No Finding output, skip works on the plain label space
    assert loss("msml", [[1.0, 0.0, 0.5]], [[1, 0, 0]], names=("a", "b", "c"), healthy="skip").item() \
        == pytest.approx(expected, rel=1e-6)


def test_msml_bad_options_are_clear_errors():
    with pytest.raises(CxrlabError, match="did you mean 'skip'"):
        LOSSES.get("msml")(ctx(), healthy="skp")
    with pytest.raises(CxrlabError, match="No Finding.*add_no_finding"):
        LOSSES.get("msml")(ctx(("a", "b", "c")))
    with pytest.raises(CxrlabError, match="did you mean 'correlation'"):
        LOSSES.get("corloss")(ctx(), form="corelation")
    with pytest.raises(CxrlabError, match="exclusivity needs a 'No Finding' output"):
        LOSSES.get("corloss")(ctx(("a", "b", "c")), form="exclusivity")


# --------------------------------------------------------------------------------------------- corloss

def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_corloss_exclusivity_by_hand():
    logits = [[0.0, 2.0, -1.0, 1.0], [-3.0, -2.0, -1.0, 4.0]]
    expected = (sigmoid(1.0) * sigmoid(2.0) + sigmoid(4.0) * sigmoid(-1.0)) / 2
    # it reads no labels: targets and masks do not matter
    for target, mask in (([[1, 0, 0, 0], [0, 0, 0, 1]], None), ([[0, 0, 0, 0], [1, 1, 1, 1]], [[0, 0, 0, 0]] * 2)):
        value = loss("corloss", logits, target, mask, form="exclusivity")
        assert value.item() == pytest.approx(expected, rel=1e-6)
    # No Finding need not be the last output
    moved = loss("corloss", [[1.0, 0.0, 2.0, -1.0]], [[0, 0, 0, 0]], names=(NO_FINDING, "a", "b", "c"))
    assert moved.item() == pytest.approx(sigmoid(1.0) * sigmoid(2.0), rel=1e-6)


def test_corloss_correlation_by_hand():
    logits = np.array([[2.0, -1.0, 0.5, -2.0], [1.0, 1.5, -0.5, 0.0], [0.1, 0.2, 0.3, 0.4]])
    target = np.array([[1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=np.float32)
    probs = 1 / (1 + np.exp(-logits))
    r1 = np.corrcoef(probs[0], target[0])[0, 1]
    r2 = np.corrcoef(probs[1, :3], target[1, :3])[0, 1]  # the unknown 4th output is left out
    expected = ((1 - r1) + (1 - r2)) / 2  # image 3: constant labels, Pearson undefined -> skipped
    value = loss("corloss", logits, target, mask, form="correlation", names=("a", "b", "c", "d"))
    assert value.item() == pytest.approx(expected, abs=1e-5)
    # Pearson wants equal probabilities within the positives and within the negatives: the lower
    # positive (c) and the lower negative (d) rise, the higher negative (b) falls
    x = torch.tensor(logits[:1], dtype=torch.float32, requires_grad=True)
    loss("corloss", x, target[:1], form="correlation", names=("a", "b", "c", "d")).backward()
    assert x.grad[0, 2] < 0 and x.grad[0, 3] < 0 and x.grad[0, 1] > 0
    from cxrlab.losses.msml import correlation_loss

    t, m = torch.tensor(target, dtype=torch.float64), torch.tensor(mask, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: correlation_loss(z, t, m),
                                    torch.tensor(logits, dtype=torch.float64, requires_grad=True))


# -------------------------------------------------------------------------------------------- bilinear

def fmap(b=3, d=6, h=4, w=5, seed=0) -> torch.Tensor:
    return torch.randn(b, d, h, w, generator=torch.Generator().manual_seed(seed))


def test_bilinear_output_dimension_and_normalisation():
    head = HEADS.get("bilinear")(6, 5, dim=None)
    x = fmap()
    out = head(x)
    assert out.logits.shape == (3, 5) and out.extras["features"].shape == (3, 36)
    flat = x.reshape(3, 6, 20)
    gram = torch.einsum("bis,bjs->bij", flat, flat).reshape(3, 36) / 20  # vec(F Fᵀ / hw)
    expected = torch.sign(gram) * gram.abs().sqrt()
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out.extras["features"], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.extras["features"].norm(dim=1), torch.ones(3))
    torch.testing.assert_close(out.logits, head.classifier(expected), atol=1e-5, rtol=1e-4)
    scaled = HEADS.get("bilinear")(6, 5, dim=None, feature_scale=6.0)
    scaled.load_state_dict(head.state_dict())
    torch.testing.assert_close(scaled(x).logits, head.classifier(6.0 * expected), atol=1e-5, rtol=1e-4)
    reduced = HEADS.get("bilinear")(6, 5, dim=4)(x)
    assert reduced.extras["features"].shape == (3, 16)
    for sketch in ("tensor_sketch", "random_maclaurin"):
        compact = HEADS.get("bilinear")(6, 5, dim=4, compact=True, sketch=sketch, compact_dim=128)(x)
        assert compact.logits.shape == (3, 5) and compact.extras["features"].shape == (3, 128)
        torch.testing.assert_close(compact.extras["features"].norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("sketch", ["tensor_sketch", "random_maclaurin"])
def test_compact_pooling_approximates_the_bilinear_kernel(sketch):
    """⟨φ(X), φ(Y)⟩ ≈ ⟨vec(XXᵀ/hw), vec(YYᵀ/hw)⟩ at 8192 dims: error below 0.05 of ‖B(X)‖‖B(Y)‖
    (we measured about 0.02 at worst over 8 pairs and 3 projection seeds; the estimator's std is
    O(1/√8192) of that scale), on correlated pairs whose normalised kernel is about 0.78."""
    from cxrlab.models.heads.bilinear import RandomMaclaurin, TensorSketch, bilinear_pool

    pool_cls = TensorSketch if sketch == "tensor_sketch" else RandomMaclaurin
    x = fmap(8, 32, 4, 4, seed=0)
    y = x + 0.7 * fmap(8, 32, 4, 4, seed=1)
    bx, by = bilinear_pool(x), bilinear_pool(y)
    scale = bx.norm(dim=1) * by.norm(dim=1)
    full = (bx * by).sum(1) / scale
    assert (full > 0.5).all()  # a kernel value worth approximating
    for seed in range(3):
        pool = pool_cls(32, 8192, torch.Generator().manual_seed(seed))
        compact = (pool(x) * pool(y)).sum(1) / scale
        assert (compact - full).abs().max() < 0.05
    # a kernel near 0 stays near 0: independent maps
    z = fmap(8, 32, 4, 4, seed=2) - fmap(8, 32, 4, 4, seed=2).mean()
    pool = pool_cls(32, 8192, torch.Generator().manual_seed(0))
    bz = bilinear_pool(z)
    err = ((pool(x) * pool(z)).sum(1) - (bx * bz).sum(1)) / (bx.norm(dim=1) * bz.norm(dim=1))
    assert err.abs().max() < 0.05


def test_bilinear_head_in_a_model_and_bad_options():
    from cxrlab.models import build_model

    model = build_model("resnet18", "bilinear", 4, head_args={"dim": 32, "compact": True, "compact_dim": 256})
    out = model(torch.rand(2, 1, 64, 64))
    assert out.logits.shape == (2, 4) and out.extras["features"].shape == (2, 256)
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.head.parameters())
    with pytest.raises(CxrlabError, match="did you mean 'tensor_sketch'"):
        HEADS.get("bilinear")(6, 5, compact=True, sketch="tensor_skech")
    with pytest.raises(CxrlabError, match="expected a B×6×h×w"):
        HEADS.get("bilinear")(6, 5)(torch.randn(2, 5, 3, 3))


def test_bilinear_head_learns_second_order_labels_with_the_msml_objective():
    """Labels that depend only on channel co-variation (invisible to average pooling): the bilinear
    head with bce + msml + corloss drives the loss down and separates the labels."""
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    x, target = _second_order_data(256, seed=0)
    head = HEADS.get("bilinear")(6, 4, dim=None)
    objective = Objective({"bce": 1.0, "msml": 0.1, "corloss": 0.3},
                          LossContext.from_targets(NAMES, target.numpy(), np.ones((256, 4))))
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    batch = {"target": target, "mask": torch.ones_like(target)}
    losses = []
    for _ in range(60):
        total, parts = objective(head(x), batch)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
        assert {"bce", "msml", "corloss"} <= set(parts)
    assert losses[-1] < 0.6 * losses[0]
    x_test, y_test = _second_order_data(256, seed=1)
    with torch.no_grad():
        probs = torch.sigmoid(head(x_test).logits)
    aucs = [roc_auc_score(y_test[:, j], probs[:, j]) for j in range(3)]
    assert min(aucs) > 0.8, aucs
    # average pooling cannot see it: the same labels from a linear head stay near chance
    linear = HEADS.get("linear")(6, 4)
    opt = torch.optim.Adam(linear.parameters(), lr=0.05)
    for _ in range(60):
        total, _ = objective(linear(x), batch)
        opt.zero_grad()
        total.backward()
        opt.step()
    with torch.no_grad():
        probs = torch.sigmoid(linear(x_test).logits)
    assert max(roc_auc_score(y_test[:, j], probs[:, j]) for j in range(3)) < 0.7


def _second_order_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, 4, 4, generator=g)
    target = torch.zeros(n, 4)
    for j, (a, b) in enumerate(((0, 1), (2, 3), (4, 5))):
        target[:, j] = (torch.rand(n, generator=g) < 0.35).float()
        sign = target[:, j] * 2 - 1  # positive: channels a and b move together, negative: apart
        x[:, b] = 0.3 * x[:, b] + 0.95 * sign[:, None, None] * x[:, a]
    target[:, 3] = (target[:, :3].sum(1) == 0).float()  # No Finding
    return x, target


def test_no_finding_output_added_by_the_policy():
    from cxrlab.data.policies import apply_policy

    space = LabelSpace("t", ("a", "b"))
    values = np.array([[1, 0], [0, 0], [np.nan, 0], [-1, 0], [-1, 1]], dtype=np.float32)
    result = apply_policy(values, space, "u_ignore", add_no_finding=True, blank="ignore")
    assert result.labels.names == ("a", "b", NO_FINDING)
    np.testing.assert_array_equal(result.target[:, 2], [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(result.mask[:, 2], [1, 1, 0, 0, 1])  # unknown when no positive is seen
    assert apply_policy(values[:2], space, "full", add_no_finding=False).labels.names == ("a", "b")


def test_heatmaps_of_a_bilinear_head_say_why_native_fails_and_gradcam_works():
    from cxrlab.inference.heatmaps import gradcam_maps, label_heatmaps
    from cxrlab.models import build_model

    model = build_model("test_resnet", "bilinear", 3, head_args={"dim": 8}).eval()
    x = torch.rand(2, 1, 32, 32)
    with pytest.raises(CxrlabError, match="head 'bilinear' has no class activation map.*method gradcam"):
        label_heatmaps(model, x)
    maps = gradcam_maps(model, x, [0, 2])
    assert maps.shape == (2, 32, 32) and np.isfinite(maps).all()


# ------------------------------------------------- issue 23: third-party formulas, BN+ReLU, recipes

def test_msml_without_log_by_hand_and_gradcheck():
    """log: false is −mean over positives of the softmax probability against the negatives."""
    from cxrlab.losses.msml import msml_loss

    logits = [[2.0, 0.0, -1.0, 1.0], [0.0, 3.0, 1.0, 5.0]]
    target = [[1, 0, 0, 1], [1, 0, 0, 1]]
    mask = [[1, 1, 1, 1], [1, 1, 1, 0]]
    p = math.exp(2.0) / (math.exp(2.0) + math.exp(0.0) + math.exp(-1.0))  # 0.8438
    q = math.exp(1.0) / (math.exp(1.0) + math.exp(0.0) + math.exp(-1.0))  # 0.6652
    r = 1 / (1 + math.exp(3.0) + math.exp(1.0))  # 0.0420: image 2's positive against {3, 1}
    assert (-(p + q) / 2 - r) / 2 == pytest.approx(-0.39826, abs=1e-5)  # worked out on paper
    value = loss("msml", logits, target, mask, log=False)
    assert value.item() == pytest.approx(-0.39826, abs=1e-5)
    # gradient in the positive's own logit: d/ds_p (−p/|P|) = −p(1 − p)/|P|, halved by the batch mean
    x = torch.tensor(logits, requires_grad=True)
    loss("msml", x, target, mask, log=False).backward()
    assert x.grad[0, 0].item() == pytest.approx(-p * (1 - p) / 2 / 2, rel=1e-5)
    assert x.grad[1, 3].item() == 0.0  # masked: no gradient
    t, m = torch.tensor(target, dtype=torch.float64), torch.tensor(mask, dtype=torch.float64)
    z = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: msml_loss(v, t, m, log=False), z)
    # the log form is unchanged by the option's presence
    assert loss("msml", logits, target, mask, log=True).item() == pytest.approx(loss("msml", logits, target, mask).item())
    with pytest.raises(CxrlabError, match="option log must be true or false"):
        LOSSES.get("msml")(ctx(), log="no")


def test_corloss_positive_product_by_hand_gradients_and_many_labels():
    from cxrlab.losses.msml import positive_product_loss

    logits = [[2.0, 0.0, -1.0, 1.0], [0.0, 3.0, 1.0, 5.0], [4.0, 4.0, 4.0, 4.0]]
    target = [[1, 0, 0, 1], [1, 0, 0, 1], [0, 0, 0, 0]]
    mask = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]  # image 2: label 4 unknown; image 3: no positive
    prod1 = sigmoid(2.0) * sigmoid(1.0)  # 0.6439
    assert -(prod1 + sigmoid(0.0)) / 2 == pytest.approx(-0.57196, abs=1e-5)
    x = torch.tensor(logits, requires_grad=True)
    value = loss("corloss", x, target, mask, form="positive_product")
    assert value.item() == pytest.approx(-0.57196, abs=1e-5)  # image 3 left out of the mean
    value.backward()
    # ∂/∂s_c (−Π) = −Π (1 − σ(s_c)), over the 2 counted images
    assert x.grad[0, 0].item() == pytest.approx(-prod1 * (1 - sigmoid(2.0)) / 2, rel=1e-5)
    assert x.grad[1, 0].item() == pytest.approx(-0.5 * 0.5 / 2, rel=1e-5)
    assert x.grad[0, 1].item() == 0.0 and x.grad[1, 3].item() == 0.0 and x.grad[2].abs().sum() == 0
    t, m = torch.tensor(target, dtype=torch.float64), torch.tensor(mask, dtype=torch.float64)
    z = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: positive_product_loss(v, t, m), z)
    # many labels: 300 positives at logit −40 underflow to a product of 0 without NaN; at +20 it is ≈ 1
    many = torch.ones(2, 300)
    low = torch.full((2, 300), -40.0, requires_grad=True)
    out = positive_product_loss(low, many, many)
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(low.grad).all()
    high = positive_product_loss(torch.full((1, 300), 20.0), many[:1], many[:1])
    assert high.item() == pytest.approx(-math.exp(-300 * math.log1p(math.exp(-20.0))), rel=1e-6)
    # no "No Finding" output needed
    assert torch.isfinite(loss("corloss", logits, target, mask, form="positive_product", names=("a", "b", "c", "d")))


def test_bilinear_bn_relu_reduction_shapes_and_non_negative_pool():
    from cxrlab.models.heads.bilinear import bilinear_pool

    torch.manual_seed(0)
    x = fmap(4, 6, 4, 5)
    plain = HEADS.get("bilinear")(6, 3, dim=5)
    head = HEADS.get("bilinear")(6, 3, dim=5, reduce_act="bn_relu")
    assert [type(m).__name__ for m in head.reduce] == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert head.reduce[0].bias is None  # BN carries the shift
    out = head(x)
    assert out.logits.shape == (4, 3) and out.extras["features"].shape == (4, 25)
    torch.testing.assert_close(out.extras["features"].norm(dim=1), torch.ones(4))
    reduced = head.reduce(x)
    assert reduced.shape == (4, 5, 4, 5) and (reduced >= 0).all() and (reduced > 0).any()
    assert (bilinear_pool(reduced) >= 0).all() and (out.extras["features"] >= 0).all()
    assert (bilinear_pool(plain.reduce(x)) < 0).float().mean() > 0.2  # the plain conv: many negative
    # eval mode uses the running statistics: still non-negative, and a state dict round trip is exact
    head.eval()
    copy = HEADS.get("bilinear")(6, 3, dim=5, reduce_act="bn_relu").eval()
    copy.load_state_dict(head.state_dict())
    assert "reduce.1.running_mean" in head.state_dict()
    torch.testing.assert_close(copy(x).logits, head(x).logits)
    assert (head.reduce(x) >= 0).all()
    with pytest.raises(CxrlabError, match="did you mean 'bn_relu'"):
        HEADS.get("bilinear")(6, 3, reduce_act="bnrelu")
    with pytest.raises(CxrlabError, match="bn_relu acts on the 1×1 reduction, so it needs dim > 0"):
        HEADS.get("bilinear")(6, 3, dim=None, reduce_act="bn_relu")


NEW_MSML_RECIPES = ["msml_synthetic_bilinear_headlr", "msml_synthetic_bilinear_bnrelu",
                    "msml_synthetic_msml_nolog_product", "msml_synthetic_msml_nolog_product_paper_weights"]
SMOKE = ["data.source=synthetic:300", "data.image_size=32", "model.backbone=test_resnet", "train.epochs=1",
         "train.batch_size=64", "eval.bootstrap=0"]



@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    import cxrlab.evaluation.report as report

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "write_report", _no_plots)
        yield tmp_path_factory.mktemp("msml_smoke")


def _smoke(recipe: str, out, cache, extra=()):
    from cxrlab.workflows.train import train

    torch.set_num_threads(1)
    return train(recipe, out, [*SMOKE, f"data.cache_dir={cache}", *extra])


@pytest.mark.parametrize("recipe", NEW_MSML_RECIPES)
def test_new_msml_recipes_train_one_epoch(recipe, smoke_dir):
    from cxrlab.config import load_recipe

    _smoke(recipe, smoke_dir / recipe, smoke_dir / "cache")
    assert (smoke_dir / recipe / "best" / "model.safetensors").is_file()
    loaded = load_recipe(recipe)
    if "bilinear" in recipe:  # the explicit head rate replaces the input scale
        assert loaded.model.head_args.get("feature_scale", 1.0) == 1.0 and loaded.optim.head_lr_mult > 1


def test_classifier_first_then_fine_tune_recipes(smoke_dir):
    """Stage 1 (BCE baseline) → classifier first (backbone loaded and frozen: unchanged) → fine-tune (all
    weights loaded, nothing frozen: the backbone moves)."""
    from safetensors.torch import load_file

    def weights(run):
        return load_file(str(run / "best" / "model.safetensors"))

    s1, s2, s3 = smoke_dir / "stage1", smoke_dir / "stage2", smoke_dir / "stage3"
    _smoke("msml_synthetic_bce", s1, smoke_dir / "cache")
    _smoke("msml_synthetic_classifier_first", s2, smoke_dir / "cache", [f"model.init_from.path={s1}"])
    _smoke("msml_synthetic_fine_tune", s3, smoke_dir / "cache", [f"model.init_from={s2}"])
    w1, w2, w3 = weights(s1), weights(s2), weights(s3)
    backbone = [k for k in w1 if k.startswith("model.backbone.") and w1[k].is_floating_point()]
    assert backbone and all(torch.equal(w1[k], w2[k]) for k in backbone)  # frozen, statistics too
    assert "model.head.reduce.1.weight" in w2  # the BN+ReLU bilinear head
    assert any(not torch.equal(w2[k], w3[k]) for k in backbone)
