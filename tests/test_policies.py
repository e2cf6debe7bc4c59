"""Label policies on a hand-checkable matrix, and SPML's draw (one positive, seeded, uniform)."""
from __future__ import annotations

import numpy as np
import pytest

from cxrlab.data.policies import apply_policy
from cxrlab.errors import CxrlabError
from cxrlab.labels import CHEXPERT14, NIH14, NO_FINDING, LabelSpace

N = np.nan
ABCD = LabelSpace("abcd", ("A", "B", "C", "D"))
VALUES = np.array([[1, 0, -1, N],
                   [-1, -1, N, 0],
                   [0, 0, 0, 0],
                   [N, N, N, 1]], dtype=np.float32)


def test_u_ones_u_zeros_u_ignore():
    ones = apply_policy(VALUES, ABCD, "u_ones")
    np.testing.assert_array_equal(ones.target, [[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(ones.mask, np.ones((4, 4)))
    zeros = apply_policy(VALUES, ABCD, "u_zeros")
    np.testing.assert_array_equal(zeros.target, [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
    ignore = apply_policy(VALUES, ABCD, "u_ignore")
    np.testing.assert_array_equal(ignore.target, zeros.target)
    np.testing.assert_array_equal(ignore.mask, [[1, 1, 0, 1], [0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
    for result in (ones, zeros, ignore):
        assert result.target.dtype == np.float32 and result.mask.dtype == np.float32
        assert result.rows.tolist() == [0, 1, 2, 3] and result.labels == ABCD and result.full_target is None


def test_blank_can_be_unknown_instead_of_negative():
    result = apply_policy(VALUES, ABCD, "u_zeros", blank="ignore")
    np.testing.assert_array_equal(result.mask, [[1, 1, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 1]])


def test_unpacks_as_target_mask_rows():
    target, mask, rows = apply_policy(VALUES, ABCD, "u_ones")
    assert target.shape == mask.shape == (4, 4) and rows.tolist() == [0, 1, 2, 3]


def test_full_accepts_complete_labels_and_refuses_uncertain_ones():
    complete = np.nan_to_num(np.where(VALUES == -1, 0, VALUES))
    result = apply_policy(np.where(VALUES == -1, np.nan, VALUES), ABCD, "full")  # blank → known 0
    np.testing.assert_array_equal(result.target, complete)
    np.testing.assert_array_equal(result.mask, np.ones((4, 4)))
    with pytest.raises(CxrlabError, match="label 'A' has 1 uncertain.*u_ones, u_zeros or u_ignore"):
        apply_policy(VALUES, ABCD, "full")


def test_per_label_overrides():
    result = apply_policy(VALUES, ABCD, "u_zeros", per_label={"B": "u_ones", "C": "u_ignore"})
    np.testing.assert_array_equal(result.target[:, :3], [[1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(result.mask[:, 2], [0, 1, 1, 1])  # C's uncertain in row 0 masked
    # base 'full' is fine for D, which has no uncertain value, once A, B and C are overridden
    result = apply_policy(VALUES, ABCD, "full", per_label={"A": "u_ones", "B": "u_ones", "C": "u_zeros"})
    assert result.target[1].tolist() == [1, 1, 0, 0]


@pytest.mark.parametrize("call, message", [
    (dict(policy="u_one"), "did you mean 'u_ones'"),
    (dict(policy="spm"), "did you mean 'spml'"),
    (dict(policy="u_zeros", per_label={"Bee": "u_ones"}), "label .*'Bee'"),
    (dict(policy="u_zeros", per_label={"B": "u_igonre"}), "did you mean 'u_ignore'"),
    (dict(policy="spml", no_finding="dorp"), "did you mean 'drop'"),
])
def test_unknown_names_suggest_the_closest(call, message):
    with pytest.raises(CxrlabError, match=message):
        apply_policy(VALUES, ABCD, **call)


def test_unknown_label_in_per_label_on_a_real_space():
    with pytest.raises(CxrlabError, match="did you mean 'Edema'"):
        apply_policy(np.zeros((1, 14)), CHEXPERT14, "u_ones", per_label={"Edma": "u_zeros"})


def test_bad_values_and_shapes():
    with pytest.raises(CxrlabError, match="row 0, label 'B'.*2.0"):
        apply_policy([[1, 2, 0, 0]], ABCD, "u_ones")
    with pytest.raises(CxrlabError, match="N×4"):
        apply_policy(np.zeros((3, 5)), ABCD, "u_ones")


# --- SPML --------------------------------------------------------------------------------------------

def test_spml_keeps_exactly_one_true_positive_per_image():
    result = apply_policy(VALUES, ABCD, "spml", seed=3)
    assert result.labels.names == ("A", "B", "C", "D", NO_FINDING)  # added: rows 1 and 2 have no positive
    np.testing.assert_array_equal(result.target, result.mask)  # only the observed positive is known
    assert result.target.sum(1).tolist() == [1, 1, 1, 1]
    # row 0: A is the only positive (C is uncertain → 0); row 1: only uncertain → No Finding;
    # row 2: all negative → No Finding; row 3: D
    assert result.target.argmax(1).tolist() == [0, 4, 4, 3]
    np.testing.assert_array_equal(result.full_target, [[1, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 1],
                                                       [0, 0, 0, 1, 0]])


def test_spml_drop_removes_images_without_positive():
    result = apply_policy(VALUES, ABCD, "spml", no_finding="drop")
    assert result.labels == ABCD and result.rows.tolist() == [0, 3]
    assert result.target.argmax(1).tolist() == [0, 3]


def test_spml_uses_an_existing_no_finding_label():
    values = np.full((2, 14), np.nan, np.float32)
    values[0, CHEXPERT14.index("Edema")] = 1
    result = apply_policy(values, CHEXPERT14, "spml")
    assert result.labels == CHEXPERT14
    assert [CHEXPERT14.names[j] for j in result.target.argmax(1)] == ["Edema", NO_FINDING]


def test_spml_draw_is_uniform_reproducible_and_seeded():
    rng = np.random.default_rng(0)
    values = (rng.random((4000, 14)) < 0.2).astype(np.float32)
    values[:, :2] = 1  # every image has A and B positive, plus a few others
    a = apply_policy(values, NIH14, "spml", seed=7)
    b = apply_policy(values, NIH14, "spml", seed=7)
    c = apply_policy(values, NIH14, "spml", seed=8)
    np.testing.assert_array_equal(a.target, b.target)
    assert (a.target != c.target).any()
    picked = a.target.argmax(1)
    assert np.all(values[np.arange(len(values)), picked] == 1)  # always a real positive
    # among images whose only positives are the first two labels, each is picked half the time
    two = values.sum(1) == 2
    share = float((picked[two] == 0).mean())
    assert two.sum() > 150 and abs(share - 0.5) < 0.1


def test_spml_with_keys_does_not_depend_on_row_order():
    values = np.array([[1, 1, 1, 0], [1, 0, 1, 1], [0, 1, 1, 1], [1, 1, 0, 1]] * 5, dtype=np.float32)
    keys = [f"img{i}.png" for i in range(len(values))]
    order = np.random.default_rng(1).permutation(len(values))
    straight = apply_policy(values, ABCD, "spml", seed=5, keys=keys).target.argmax(1)
    shuffled = apply_policy(values[order], ABCD, "spml", seed=5, keys=[keys[i] for i in order]).target.argmax(1)
    np.testing.assert_array_equal(straight[order], shuffled)
