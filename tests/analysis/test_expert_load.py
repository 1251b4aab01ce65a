import math

import numpy as np
import pytest

from xmoe.analysis import expert_counts, expert_load, inter_run_consistency, normalize_counts


def test_load_per_group_is_the_fraction_of_routed_tokens_per_expert():
    experts = [0, 1, 1, -1, 2, 2]
    languages = [0, 0, 0, 0, 1, 1]  # language 0 has 3 routed tokens (one is -1), language 1 has 2
    load = expert_load(experts, num_experts=3, groups=languages)
    np.testing.assert_allclose(load, [[1 / 3, 2 / 3, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(load.sum(axis=1), 1.0)


def test_load_without_groups_is_one_row():
    np.testing.assert_allclose(expert_load(np.array([[0, 1], [1, -1]]), num_experts=2), [[1 / 3, 2 / 3]])


def test_counts_accumulate_across_batches_before_normalising():
    batches = [([0, 0, 1], [0, 0, 1]), ([1, 1, -1], [0, 1, 1])]
    total = sum(expert_counts(experts, 2, groups, num_groups=2) for experts, groups in batches)
    np.testing.assert_array_equal(total, [[2, 1], [0, 2]])
    np.testing.assert_allclose(normalize_counts(total), [[2 / 3, 1 / 3], [0.0, 1.0]])


def test_a_group_without_routed_tokens_is_a_row_of_nan():
    load = expert_load([0, -1], num_experts=2, groups=[0, 1], num_groups=3)
    assert np.isnan(load[1:]).all() and load[0].tolist() == [1.0, 0.0]


def test_expert_index_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="expert indices"):
        expert_load([0, 2], num_experts=2)


LOAD = [0.1, 0.2, 0.3, 0.4]


def test_identical_runs_are_perfectly_consistent():
    assert inter_run_consistency([LOAD, LOAD, LOAD]) == pytest.approx(1.0)


def test_reversed_run_is_negatively_correlated():
    # LOAD reversed = 0.5 - LOAD, an exact linear function with slope -1: r = -1.
    assert inter_run_consistency([LOAD, LOAD[::-1]]) == pytest.approx(-1.0)
    # Pairs (LOAD, LOAD) = 1, (LOAD, rev) = -1, (LOAD, rev) = -1  ->  mean -1/3.
    assert inter_run_consistency([LOAD, LOAD, LOAD[::-1]]) == pytest.approx(-1 / 3)


def test_partially_agreeing_runs_match_the_hand_computed_correlation():
    # Centred: a = (-.15, -.05, .05, .15), b = (-.15, -.05, .15, .05)
    # a.b = .0225 + .0025 + .0075 + .0075 = .04;  |a|^2 = |b|^2 = .05  ->  r = .04 / .05 = 0.8
    assert inter_run_consistency([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.4, 0.3]]) == pytest.approx(0.8)


def test_per_language_loads_are_compared_as_one_flattened_vector():
    loads_RGE = np.array([[[0.1, 0.9], [0.5, 0.5]], [[0.1, 0.9], [0.5, 0.5]]])
    assert inter_run_consistency(loads_RGE) == pytest.approx(1.0)


def test_constant_load_or_single_run_is_rejected():
    with pytest.raises(ValueError, match="constant"):
        inter_run_consistency([LOAD, [0.25, 0.25, 0.25, 0.25]])
    with pytest.raises(ValueError, match="at least 2 runs"):
        inter_run_consistency([LOAD])
    with pytest.raises(ValueError, match="NaN"):
        inter_run_consistency([LOAD, [math.nan, 0.2, 0.3, 0.5]])
