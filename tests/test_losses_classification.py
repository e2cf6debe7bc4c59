"""Baseline loss terms: hand-computed values, masking, gradients, and their special cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cxrlab.errors import CxrlabError
from cxrlab.losses.base import LossContext, Objective
from cxrlab.output import Output
from cxrlab.registry import LOSSES

LOGITS = [[2.0, -1.0, 0.5], [-3.0, 0.0, 1.5]]
TARGET = [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
MASK = [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]


def ctx(pos=(1, 1, 0), neg=(1, 3, 2)) -> LossContext:
    labels = ("a", "b", "c")
    return LossContext(labels, 4, np.array(pos, float), np.array(neg, float), np.eye(3), 1.0)


def term(name, c=None, **args):
    return LOSSES.get(name)(c or ctx(), **args)


def batch(logits=LOGITS, target=TARGET, mask=MASK, dtype=torch.float32):
    return (Output(torch.tensor(logits, dtype=dtype)),
            {"target": torch.tensor(target, dtype=dtype), "mask": torch.tensor(mask, dtype=dtype)})


def sig(x):
    return 1 / (1 + math.exp(-x))


def known_mean(fn):
    values = [fn(x, y) for xs, ys, ms in zip(LOGITS, TARGET, MASK) for x, y, m in zip(xs, ys, ms) if m]
    return sum(values) / len(values)


def bce(x, y):
    p = sig(x)
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_bce_by_hand():
    assert float(term("bce")(*batch())) == pytest.approx(known_mean(bce), rel=1e-6)


def test_weighted_bce_by_hand():
    # pos (1, 1, 0), neg (1, 3, 2): weights 1, 3, and 1 for the label without positives.
    w = [1.0, 3.0, 1.0]
    values = [-(w[j] * y * math.log(sig(x)) + (1 - y) * math.log(1 - sig(x)))
              for xs, ys, ms in zip(LOGITS, TARGET, MASK) for j, (x, y, m) in enumerate(zip(xs, ys, ms)) if m]
    expected = sum(values) / len(values)
    assert float(term("weighted_bce")(*batch())) == pytest.approx(expected, rel=1e-6)


def test_weighted_bce_clamps():
    t = term("weighted_bce", ctx(pos=(1, 1000, 0), neg=(10000, 1, 5)), max_weight=50.0)
    assert t.pos_weight.tolist() == pytest.approx([50.0, 1 / 50.0, 1.0])
    assert "pos_weight" not in t.state_dict()  # derived from the data, not checkpointed state


def test_focal_by_hand():
    gamma, alpha = 2.0, 0.25

    def focal(x, y):
        p = sig(x)
        return -(alpha * y * (1 - p) ** gamma * math.log(p) + (1 - alpha) * (1 - y) * p ** gamma * math.log(1 - p))

    assert float(term("focal", gamma=gamma, alpha=alpha)(*batch())) == pytest.approx(known_mean(focal), rel=1e-6)


def test_asl_by_hand():
    gn, gp, m = 4.0, 1.0, 0.05

    def asl(x, y):
        p = sig(x)
        pm = max(p - m, 0.0)
        return -(y * (1 - p) ** gp * math.log(p) + (1 - y) * pm ** gn * math.log(1 - pm))

    got = term("asl", gamma_neg=gn, gamma_pos=gp, margin=m)(*batch())
    assert float(got) == pytest.approx(known_mean(asl), rel=1e-6)


def test_special_cases_reduce_to_bce():
    out, b = batch()
    reference = float(term("bce")(out, b))
    assert float(term("focal", gamma=0.0, alpha=0.5)(out, b)) == pytest.approx(reference / 2, rel=1e-6)
    assert float(term("asl", gamma_neg=0.0, gamma_pos=0.0, margin=0.0)(out, b)) == pytest.approx(reference, rel=1e-6)
    balanced = ctx(pos=(2, 2, 2), neg=(2, 2, 2))  # pos_weight 1 everywhere
    assert float(term("weighted_bce", balanced)(out, b)) == pytest.approx(reference, rel=1e-6)


@pytest.mark.parametrize("name,args", [("bce", {}), ("weighted_bce", {}), ("focal", {}), ("asl", {}),
                                       ("asl", {"focus_no_grad": True})])
def test_masked_entries_contribute_nothing(name, args):
    t = term(name, **args)
    out, b = batch()
    flipped = [[TARGET[0][0], TARGET[0][1], 1 - TARGET[0][2]], TARGET[1]]  # entry (0, 2) is masked
    _, b2 = batch(target=flipped)
    assert float(t(out, b)) == float(t(out, b2))
    logits = torch.tensor(LOGITS, requires_grad=True)
    t(Output(logits), b).backward()
    assert logits.grad[0, 2] == 0 and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name,args", [("bce", {}), ("weighted_bce", {}), ("focal", {"alpha": 0.3}),
                                       ("asl", {}), ("asl", {"gamma_neg": 2.0, "margin": 0.0})])
def test_gradcheck(name, args):
    t = term(name, **args).double()
    target = torch.tensor(TARGET, dtype=torch.float64)
    mask = torch.tensor(MASK, dtype=torch.float64)
    logits = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)

    def f(x):
        return t(Output(x), {"target": target, "mask": mask})

    assert torch.autograd.gradcheck(f, (logits,))


@pytest.mark.parametrize("name", ["bce", "weighted_bce", "focal", "asl"])
def test_stable_at_extreme_logits(name):
    out, b = batch(logits=[[80.0, -80.0, 200.0], [-200.0, 90.0, -90.0]])
    out.logits.requires_grad_(True)
    value = term(name)(out, b)
    value.backward()
    assert torch.isfinite(value) and torch.all(torch.isfinite(out.logits.grad))


def test_no_known_entry_gives_zero():
    out, b = batch(mask=[[0.0] * 3] * 2)
    assert float(term("bce")(out, b)) == 0.0


def test_bad_arguments_are_named():
    with pytest.raises(CxrlabError, match="alpha"):
        term("focal", alpha=2.0)
    with pytest.raises(CxrlabError, match="margin"):
        term("asl", margin=-0.1)
    with pytest.raises(CxrlabError, match="gama"):
        Objective({"focal": {"gama": 2.0}}, ctx())


def test_objective_logs_terms_by_name():
    objective = Objective({"bce": 1.0, "asl": {"weight": 0.5, "gamma_neg": 2.0}}, ctx())
    total, logs = objective(*batch())
    assert set(logs) == {"bce", "asl", "loss"}
    assert logs["loss"] == pytest.approx(logs["bce"] + 0.5 * logs["asl"], rel=1e-6)
