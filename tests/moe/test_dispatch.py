import pytest
import torch

from xmoe.moe import capacity_for, dropless_capacity, plan_dispatch


def test_capacity_formula():
    assert capacity_for(num_tokens=10, num_experts=4, top_k=1, capacity_factor=1.0) == 3
    assert capacity_for(num_tokens=10, num_experts=4, top_k=2, capacity_factor=1.25) == 7
    assert capacity_for(num_tokens=10, num_experts=4, top_k=1, capacity_factor=0.0) == -1


def test_tokens_past_capacity_are_dropped_in_token_order():
    experts = torch.tensor([[1], [1], [0], [1], [1]])
    gates = torch.tensor([[0.1], [0.9], [0.5], [0.8], [0.7]])
    plan = plan_dispatch(experts, gates, num_experts=2, capacity=2)
    assert plan.kept_top1_T.tolist() == [True, True, True, False, False]
    # slot = expert * capacity + position
    assert sorted(zip(plan.token_index.tolist(), plan.slot_index.tolist())) == [(0, 2), (1, 3), (2, 0)]


def test_batch_prioritized_routing_keeps_the_highest_gates():
    experts = torch.tensor([[1], [1], [0], [1], [1]])
    gates = torch.tensor([[0.1], [0.9], [0.5], [0.8], [0.7]])
    plan = plan_dispatch(experts, gates, num_experts=2, capacity=2, batch_prioritized=True)
    assert plan.kept_top1_T.tolist() == [False, True, True, True, False]
    slots = dict(zip(plan.token_index.tolist(), plan.slot_index.tolist()))
    assert slots == {1: 2, 3: 3, 2: 0}  # highest gate takes the first slot


def test_first_choices_take_slots_before_second_choices():
    experts = torch.tensor([[0, 1], [1, 0], [0, 1]])
    gates = torch.full((3, 2), 0.5)
    plan = plan_dispatch(experts, gates, num_experts=2, capacity=2)
    kept = sorted(zip(plan.token_index.tolist(), plan.slot_index.tolist()))
    # Expert 0 gets first choices of tokens 0 and 2; token 1's second choice (expert 0) is dropped.
    # Expert 1 gets token 1 (first choice) and token 0 (second choice); token 2's second is dropped.
    assert kept == [(0, 0), (0, 3), (1, 2), (2, 1)]
    assert plan.num_assignments == 6


def test_dropless_capacity_keeps_everything():
    torch.manual_seed(0)
    experts = torch.randint(0, 4, (100, 2))
    capacity = dropless_capacity(experts, 4)
    assert capacity == int(torch.bincount(experts.reshape(-1), minlength=4).max())
    plan = plan_dispatch(experts, torch.rand(100, 2), num_experts=4, capacity=capacity)
    assert plan.token_index.numel() == 200
    assert plan.slot_index.unique().numel() == 200


def test_unrouted_assignments_are_never_kept():
    experts = torch.tensor([[0, -1], [1, 0]])
    plan = plan_dispatch(experts, torch.ones(2, 2), num_experts=2, capacity=5)
    assert plan.num_assignments == 3
    assert plan.token_index.numel() == 3


def test_negative_capacity_is_rejected():
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        plan_dispatch(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), num_experts=2, capacity=-1)
