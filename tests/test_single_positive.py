"""Single-positive baselines (AN, AN-LS, WAN, EPR, ROLE, LL-R/Ct/Cp): hand-computed values and state."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cxrlab.errors import CxrlabError
from cxrlab.losses.base import LossContext, Objective
from cxrlab.output import Output
from cxrlab.registry import LOSSES

# Two images, three labels; one observed positive each (image 0: label 0, image 1: label 1).
LOGITS = [[2.0, -1.0, 0.5], [-3.0, 0.0, 1.5]]
SPML = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
K = 1.5  # expected positives per image


def ctx(n_train: int = 4, k: float = K) -> LossContext:
    return LossContext(("a", "b", "c"), n_train, np.ones(3), np.ones(3), np.eye(3), k)


def term(name, c=None, **args):
    return LOSSES.get(name)(c or ctx(), **args)


def batch(logits=LOGITS, target=SPML, mask=SPML, index=(3, 1), grad=False):
    out = Output(torch.tensor(logits, requires_grad=grad))
    return out, {"target": torch.tensor(target), "mask": torch.tensor(mask), "index": torch.tensor(index)}


def sig(x):
    return 1 / (1 + math.exp(-x))


def nlp(x):  # −log p
    return -math.log(sig(x))


def nlq(x):  # −log(1 − p)
    return -math.log(1 - sig(x))


def entries(logits=LOGITS, target=SPML):
    return [(x, y) for xs, ys in zip(logits, target) for x, y in zip(xs, ys)]


def an_by_hand(logits=LOGITS, target=SPML):
    return sum(nlp(x) if y else nlq(x) for x, y in entries(logits, target)) / 6


def test_names_registered():
    for name in ("an", "an_ls", "wan", "epr", "role", "ll_r", "ll_ct", "ll_cp"):
        assert name in LOSSES


def test_an_by_hand():
    assert float(term("an")(*batch())) == pytest.approx(an_by_hand(), rel=1e-6)


def test_an_ls_by_hand():
    e = 0.1
    values = [(1 - e) * nlp(x) + e * nlq(x) if y else (1 - e) * nlq(x) + e * nlp(x) for x, y in entries()]
    assert float(term("an_ls")(*batch())) == pytest.approx(sum(values) / 6, rel=1e-6)
    assert float(term("an_ls", epsilon=0.0)(*batch())) == pytest.approx(an_by_hand(), rel=1e-6)


def test_wan_by_hand():
    values = [nlp(x) if y else nlq(x) / 2 for x, y in entries()]  # C − 1 = 2
    assert float(term("wan")(*batch())) == pytest.approx(sum(values) / 6, rel=1e-6)


def test_wan_known_negative_keeps_full_weight():
    mask = [[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]  # image 0 label 1 is a known negative
    values = [nlp(2.0), nlq(-1.0), nlq(0.5) / 2, nlq(-3.0) / 2, nlp(0.0), nlq(1.5) / 2]
    assert float(term("wan")(*batch(mask=mask))) == pytest.approx(sum(values) / 6, rel=1e-6)


def test_epr_by_hand():
    pos = (nlp(2.0) + nlp(0.0)) / 6
    mean_sum = sum(sum(sig(x) for x in row) for row in LOGITS) / 2
    reg = (mean_sum - K) ** 2 / 9
    assert float(term("epr")(*batch())) == pytest.approx(pos + reg, rel=1e-6)
    # the expected count can be overridden
    reg2 = (mean_sum - 1.0) ** 2 / 9
    assert float(term("epr", expected_positives=1.0)(*batch())) == pytest.approx(pos + reg2, rel=1e-6)


def test_epr_gradient_reaches_unknowns_only_through_the_regulariser():
    out, b = batch(grad=True)
    term("epr", expected_positives=1e-6)(out, b).backward()
    unknown = torch.tensor(SPML) == 0
    assert (out.logits.grad[unknown] > 0).all()  # only the regulariser, pushing probabilities down


# --------------------------------------------------------------------------------------------- ROLE

def test_role_value_by_hand():
    t = term("role")
    out, b = batch()
    est = t.label_logits.detach()[[3, 1]].clone()
    est[0, 0] = math.log(0.995 / 0.005)
    est[1, 1] = math.log(0.995 / 0.005)
    total = 0.0
    for i in range(2):
        for j in range(3):
            x, e = LOGITS[i][j], float(est[i, j])
            p, q = sig(x), sig(e)
            pos = nlp(x) if SPML[i][j] else 0.0
            cross_model = q * nlp(x) + (1 - q) * nlq(x)
            cross_labels = p * nlp(e) + (1 - p) * nlq(e)
            total += 0.5 * pos + 0.5 * (cross_model + cross_labels)
    p_sum = sum(sig(x) for row in LOGITS for x in row) / 2
    e_sum = sum(sig(float(v)) for v in est.flatten()) / 2
    reg = 0.5 * ((p_sum - K) ** 2 / 9 + (e_sum - K) ** 2 / 9)
    assert float(t(out, b).detach()) == pytest.approx(total / 6 + reg, rel=1e-5)


def test_role_label_matrix_learns_and_observed_positive_stays_fixed():
    t = term("role")
    assert t.label_logits.shape == (4, 3) and t.lr_multiplier == 10.0
    init = torch.sigmoid(t.label_logits.detach())
    assert ((init > 0.4 - 1e-6) & (init < 0.6 + 1e-6)).all()  # unknowns start near 0.5
    out, b = batch(grad=True)
    t(out, b).backward()
    g = t.label_logits.grad
    assert g[[0, 2]].abs().sum() == 0  # rows not in the batch
    assert g[3, 0] == 0 and g[1, 1] == 0  # observed positives are fixed
    assert (g[3, 1:] != 0).all() and g[1, 0] != 0 and g[1, 2] != 0  # unknowns learn
    before = t.label_logits.detach().clone()
    torch.optim.SGD([t.label_logits], lr=10.0).step()
    assert not torch.equal(before[3, 1:], t.label_logits.detach()[3, 1:])
    pos = torch.tensor(SPML) > 0.5
    fixed = torch.sigmoid(t.estimates(b, pos, torch.zeros_like(pos))).detach()
    assert float(fixed[0, 0]) == pytest.approx(0.995) and float(fixed[1, 1]) == pytest.approx(0.995)


def test_role_param_group_gets_ten_times_the_lr():
    from cxrlab.engine.optim import param_groups

    objective = Objective({"role": 1.0}, ctx())
    model = torch.nn.Linear(2, 3)
    groups = {g["name"]: g for g in param_groups([model], objective, lr=1e-4, weight_decay=1e-5)}
    assert groups["loss.role"]["lr"] == pytest.approx(1e-3)
    assert groups["loss.role"]["weight_decay"] == 0.0


def test_role_needs_index_in_range():
    t = term("role")
    out, b = batch()
    del b["index"]
    with pytest.raises(CxrlabError, match="index"):
        t(out, b)
    out, b = batch(index=(0, 4))
    with pytest.raises(CxrlabError, match="out of range"):
        t(out, b)


# ---------------------------------------------------------------------------------- Large Loss (LL)
# AN losses of the unknown entries, largest first: (1,2) x=1.5, (0,2) x=0.5, (0,1) x=-1, (1,0) x=-3.
# The observed positive (1,1) x=0 has loss log 2 = 0.69 > the unknown (0,1)'s 0.31, but is never picked.

def an_matrix():
    return [[nlp(x) if y else nlq(x) for x, y in zip(xs, ys)] for xs, ys in zip(LOGITS, SPML)]


@pytest.mark.parametrize("name", ["ll_r", "ll_ct", "ll_cp"])
def test_ll_epoch_zero_is_plain_an(name):
    t = term(name, delta=20.0)
    t.on_epoch_start(0)
    assert float(t(*batch())) == pytest.approx(an_by_hand(), rel=1e-6)


def test_ll_r_rejects_exactly_the_largest_unknown_losses():
    t = term("ll_r", delta=20.0)  # 20 % of the B×C = 6 entries per epoch
    loss = an_matrix()
    t.on_epoch_start(1)  # share 0.2 -> k = ceil(1.2) = 2
    expected = (sum(map(sum, loss)) - loss[1][2] - loss[0][2]) / 6
    assert float(t(*batch())) == pytest.approx(expected, rel=1e-6)
    t.on_epoch_start(2)  # share 0.4 -> k = ceil(2.4) = 3: the next one is (0,1), not the observed (1,1)
    expected = (sum(map(sum, loss)) - loss[1][2] - loss[0][2] - loss[0][1]) / 6
    assert float(t(*batch())) == pytest.approx(expected, rel=1e-6)
    chosen = t.modified(torch.tensor(loss), ~(torch.tensor(SPML) > 0.5))
    assert int(chosen.sum()) == 3 and not chosen[0, 0] and not chosen[1, 1]
    t.on_epoch_start(10)  # share 1 caps at the 4 unknown entries: only the observed positives remain
    assert float(t(*batch())) == pytest.approx((loss[0][0] + loss[1][1]) / 6, rel=1e-6)


def test_ll_default_deltas_are_percentages():
    assert term("ll_r").delta == 0.5 and term("ll_ct").delta == 0.2 and term("ll_cp").delta == 0.1
    t = term("ll_ct")
    t.on_epoch_start(3)
    assert t.share() == pytest.approx(0.006)  # 3 epochs × 0.2 %


def test_ll_ct_corrects_for_the_step_only():
    t = term("ll_ct", delta=20.0)
    loss = an_matrix()
    t.on_epoch_start(1)
    expected = (sum(map(sum, loss)) - loss[1][2] - loss[0][2] + nlp(1.5) + nlp(0.5)) / 6
    assert float(t(*batch())) == pytest.approx(expected, rel=1e-6)
    assert not list(t.buffers())  # nothing stored
    t.on_epoch_start(0)
    assert float(t(*batch())) == pytest.approx(an_by_hand(), rel=1e-6)


def test_ll_cp_corrects_permanently():
    t = term("ll_cp", delta=20.0)  # constant share 0.2 from epoch 1: k = 2
    loss = an_matrix()
    t.on_epoch_start(1)
    expected = (sum(map(sum, loss)) - loss[1][2] - loss[0][2] + nlp(1.5) + nlp(0.5)) / 6
    assert float(t(*batch())) == pytest.approx(expected, rel=1e-6)
    # rows of the training set: image 0 is row 3, image 1 is row 1
    assert t.corrected.nonzero().tolist() == [[1, 2], [3, 2]]
    t.on_epoch_start(0)  # no new corrections, but the stored ones stay positive
    corrected = [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
    assert float(t(*batch())) == pytest.approx(an_by_hand(target=corrected), rel=1e-6)
    assert "corrected" in t.state_dict()  # checkpointed with the objective


def test_ll_cp_records_nothing_in_eval_mode():
    t = term("ll_cp", delta=20.0).eval()
    t.on_epoch_start(1)
    t(*batch())
    assert not t.corrected.any()


def test_ll_rejects_bad_delta():
    with pytest.raises(CxrlabError, match="percentage"):
        term("ll_r", delta=150)
