import math

import numpy as np
import torch

from xmoe.analysis import routing_changes, routing_fluctuation, routing_fluctuation_series


def test_routing_against_itself_has_zero_fluctuation():
    experts_BT = torch.tensor([[0, 3, 1, -1], [2, 2, 0, -1]])
    assert routing_fluctuation(experts_BT, experts_BT.clone()) == 0.0


def test_fluctuation_is_the_exact_fraction_of_changed_tokens():
    before = [0, 1, 2, 3, 0, 1, 2, 3]
    after = [1, 1, 2, 3, 0, 1, 3, 3]  # tokens 0 and 6 moved
    assert routing_changes(before, after) == (2, 8)
    assert routing_fluctuation(before, after) == 2 / 8


def test_a_permutation_of_expert_ids_moves_every_token_it_touches():
    before = np.array([0, 1, 2, 3, 0, 1])
    relabel = np.array([1, 0, 2, 3])  # swap experts 0 and 1
    # Tokens on experts 0 and 1 (4 of 6) change; the fluctuation sees ids, not clusters.
    assert routing_fluctuation(before, relabel[before]) == 4 / 6


def test_tokens_not_routed_in_either_checkpoint_are_ignored():
    before = [0, -1, 2, 1, 1]
    after = [0, 1, -1, 2, 1]  # tokens 1 and 2 are -1 in one routing: left out
    assert routing_changes(before, after) == (1, 3)
    assert routing_fluctuation(before, after) == 1 / 3
    assert math.isnan(routing_fluctuation([-1, -1], [0, 1]))


def test_series_compares_consecutive_checkpoints():
    checkpoints = [[0, 0, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1], [1, 0, 0, 0]]
    assert routing_fluctuation_series(checkpoints) == [1 / 4, 0.0, 1.0]
    assert routing_fluctuation_series(checkpoints[:1]) == []


def test_a_reinitialised_router_fluctuates_far_more_than_a_slightly_updated_one():
    # Plain linear routers stand in for checkpoints: the metric, not the router, is under test.
    generator = torch.Generator().manual_seed(0)
    tokens_ND = torch.randn(2000, 16, generator=generator)
    router_DE, reinitialised_DE, update_DE = torch.randn(3, 16, 4, generator=generator)
    experts_N = (tokens_ND @ router_DE).argmax(1)
    after_small_update = (tokens_ND @ (router_DE + 0.01 * update_DE)).argmax(1)
    after_reinit = (tokens_ND @ reinitialised_DE).argmax(1)
    assert routing_fluctuation(experts_N, after_small_update) < 0.05
    assert routing_fluctuation(experts_N, after_reinit) > 0.6  # independent routers over 4 experts
