"""The public Python API: loss classes importable and callable without a context; the verbs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cxrlab.errors import CxrlabError
from cxrlab.registry import LOSSES

# a 2×3 example whose probabilities are 1/2, 3/4 and 1/4 (logit ±ln 3): every value below is exact
LN2, LN3, LN43 = math.log(2), math.log(3), math.log(4 / 3)
LOGITS = torch.tensor([[0.0, LN3, -LN3], [LN3, 0.0, 0.0]])
TARGET = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])  # row 2's middle label is unknown


# ------------------------------------------------------------------------------------------------ losses

def test_every_registered_loss_is_importable_by_its_class_name():
    import cxrlab.losses as losses

    for name, cls in LOSSES.items():
        assert getattr(losses, cls.__name__) is cls, name
    from cxrlab.losses import ASL, BCE, Focal, LossContext, Objective, WeightedBCE  # noqa: F401
    with pytest.raises(ImportError):
        from cxrlab.losses import Nope  # noqa: F401


def test_bce_without_a_context_by_hand():
    from cxrlab.losses import BCE

    # known entries: ln 2, ln 4, ln(4/3) | ln(4/3), ln 2
    assert float(BCE()(LOGITS, TARGET, MASK)) == pytest.approx((4 * LN2 + 2 * LN43) / 5, rel=1e-6)
    # no mask: every label known, the unknown entry -log(1/2) joins the mean
    assert float(BCE()(LOGITS, TARGET)) == pytest.approx((5 * LN2 + 2 * LN43) / 6, rel=1e-6)


def test_focal_without_a_context_by_hand():
    from cxrlab.losses import Focal

    # −α y (1−p)^γ log p − (1−α)(1−y) p^γ log(1−p), γ = 2, α = 1/4:
    # row 1: ¼·¼·ln2, ¾·(9/16)·ln4, ¾·(1/16)·ln(4/3); row 2: ¼·(1/16)·ln(4/3), (unknown), ¾·¼·ln2
    expected = (LN2 / 16 + 27 * LN2 / 32 + 3 * LN43 / 64 + LN43 / 64 + 3 * LN2 / 16) / 5
    assert float(Focal()(LOGITS, TARGET, MASK)) == pytest.approx(expected, rel=1e-6)
    assert float(Focal(gamma=0.0, alpha=0.5)(LOGITS, TARGET, MASK)) == pytest.approx((4 * LN2 + 2 * LN43) / 10)


def test_asl_without_a_context_by_hand():
    from cxrlab.losses import ASL

    # −y (1−p)^γ⁺ log p − (1−y) p_m^γ⁻ log(1−p_m), p_m = max(p − m, 0); γ⁺ = 1, γ⁻ = 4, m = 0.05
    expected = (0.5 * LN2 - 0.7 ** 4 * math.log(0.3) - 0.2 ** 4 * math.log(0.8)
                + 0.25 * LN43 - 0.45 ** 4 * math.log(0.55)) / 5
    assert float(ASL()(LOGITS, TARGET, MASK)) == pytest.approx(expected, rel=1e-6)
    plain = ASL(gamma_neg=0.0, gamma_pos=0.0, margin=0.0)(LOGITS, TARGET, MASK)
    assert float(plain) == pytest.approx((4 * LN2 + 2 * LN43) / 5, rel=1e-6)  # = BCE


def test_weighted_bce_needs_frequencies_and_says_how_to_give_them():
    from cxrlab.losses import LossContext, WeightedBCE

    with pytest.raises(CxrlabError, match=r"positive frequencies.*LossContext.from_targets.*pos_weight="):
        WeightedBCE()
    # the positives of column 0 (ln 2 and ln(4/3)) count twice
    given = WeightedBCE(pos_weight=[2.0, 5.0, 7.0])(LOGITS, TARGET, MASK)
    assert float(given) == pytest.approx((5 * LN2 + 3 * LN43) / 5, rel=1e-6)
    # from the training labels: label 0 has 1 positive and 2 negatives -> weight 2, as above
    train_target = np.array([[1, 1, 0], [0, 1, 1], [0, 0, 1]], np.float32)
    ctx = LossContext.from_targets(("a", "b", "c"), train_target, np.ones_like(train_target))
    counted = WeightedBCE(ctx)
    assert counted.pos_weight.tolist() == pytest.approx([2.0, 0.5, 0.5])
    with pytest.raises(CxrlabError, match="pos_weight has 2 values for 3 labels"):
        WeightedBCE(ctx, pos_weight=[1.0, 2.0])
    with pytest.raises(CxrlabError, match="finite and > 0"):
        WeightedBCE(pos_weight=[1.0, 0.0, 1.0])


def test_registry_names_still_build_the_same_classes_in_a_recipe_objective():
    from cxrlab.losses import ASL, LossContext, Objective
    from cxrlab.output import Output

    ctx = LossContext.from_targets(("a", "b", "c"), TARGET.numpy(), MASK.numpy())
    objective = Objective({"bce": 1.0, "asl": {"weight": 0.5, "gamma_neg": 2.0}}, ctx)
    assert type(objective.terms["asl"]) is ASL and objective.terms["asl"].gamma_neg == 2.0
    total, logged = objective(Output(LOGITS), {"target": TARGET, "mask": MASK})
    direct = (torch.nn.BCEWithLogitsLoss(reduction="none")(LOGITS, TARGET) * MASK).sum() / MASK.sum()
    assert logged["bce"] == pytest.approx(float(direct), rel=1e-6)
    assert float(total) == pytest.approx(logged["bce"] + 0.5 * float(ASL(gamma_neg=2.0)(LOGITS, TARGET, MASK)))
