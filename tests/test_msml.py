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
