"""Capacity and index-based dispatch: which token goes to which expert slot.

Shape legend: T = routed tokens, K = experts per token, A = T * K assignments, E = experts,
C = capacity (slots per expert).

NOTE: no one-hot (T, E, C) dispatch tensor is ever built. An assignment's slot is found by a
stable sort on the expert id, so memory stays O(T * K) for the plan. The kept assignments come
out grouped by expert (expert 0's first, each expert's in slot order), so the experts can run on
contiguous slices of one gathered (A_kept, D) buffer, computing only the tokens each one has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    """The kept assignments, grouped by expert: expert 0's first, each expert's in slot order."""

    token_index: torch.Tensor  # (A_kept,) long: row of the routed token in x_TD
    slot_index: torch.Tensor  # (A_kept,) long: row in the flattened (E * C, D) expert buffer
    gate: torch.Tensor  # (A_kept,) fp32: gate value of each kept assignment (differentiable)
    tokens_per_expert: list[int]  # (E,): kept assignments of each expert, summing to A_kept
    kept_top1_T: torch.Tensor  # (T,) bool: the token's first-choice assignment survived capacity
    num_assignments: int  # assignments that asked for an expert (before capacity)
    capacity: int


def capacity_for(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(capacity_factor * top_k * T / E). Dropless (factor <= 0) returns -1."""
    if capacity_factor <= 0:
        return -1
    return math.ceil(capacity_factor * top_k * num_tokens / num_experts)


def dropless_capacity(experts_TK: torch.Tensor, num_experts: int) -> int:
    """The largest number of assignments any expert received: no token is dropped at this capacity."""
    experts_A = experts_TK.reshape(-1)
    loads = torch.bincount(experts_A[experts_A >= 0], minlength=num_experts)
    return int(loads.max())


def group_by_expert(
    experts_A: torch.Tensor, order_A: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assignments grouped by expert, in `order_A` within each expert.

    Returns (assignment_S, rank_S, load_E): S runs over all A assignments sorted by expert,
    assignment_S is the assignment at each sorted position, rank_S its rank among those sent to
    the same expert, load_E how many assignments each expert received. experts_A may hold -1
    (not routed); those sort last, in a spare bucket that load_E leaves out.
    """
    bucket_A = torch.where(experts_A < 0, num_experts, experts_A)
    bucket_S, perm = torch.sort(bucket_A[order_A], stable=True)
    counts = torch.bincount(bucket_S, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank_S = torch.arange(bucket_A.numel(), device=bucket_A.device) - starts[bucket_S]
    return order_A[perm], rank_S, counts[:num_experts]


def plan_dispatch(
    experts_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    num_experts: int,
    capacity: int,
    batch_prioritized: bool = False,
) -> DispatchPlan:
    """Assign every (token, choice) to a slot of its expert, dropping those past `capacity`.

    Priority: all first choices before any second choice (as in GShard); within a choice rank,
    token order, or descending gate value when `batch_prioritized` (Riquelme et al.'s BPR).
    """
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0 (use dropless_capacity for dropless routing), got {capacity}")
    num_tokens, top_k = experts_TK.shape
    device = experts_TK.device
    experts_A = experts_TK.t().reshape(-1)  # choice-major: all first choices come first
    gates_A = gates_TK.t().reshape(-1)
    tokens_A = torch.arange(num_tokens, device=device).repeat(top_k)
    if batch_prioritized:
        choice_A = torch.arange(top_k, device=device).repeat_interleave(num_tokens)
        # Sort by gate descending, then (stable) by choice rank, so choice rank dominates.
        by_gate = torch.argsort(gates_A.detach(), descending=True, stable=True)
        order_A = by_gate[torch.sort(choice_A[by_gate], stable=True).indices]
    else:
        order_A = torch.arange(experts_A.numel(), device=device)
    assignment_S, rank_S, load_E = group_by_expert(experts_A, order_A, num_experts)
    kept_S = (rank_S < capacity) & (experts_A[assignment_S] >= 0)
    kept_assignment = assignment_S[kept_S]  # grouped by expert, in slot order
    kept_A = torch.zeros_like(experts_A, dtype=torch.bool)
    kept_A[kept_assignment] = True
    return DispatchPlan(
        token_index=tokens_A[kept_assignment],
        slot_index=experts_A[kept_assignment] * capacity + rank_S[kept_S],
        gate=gates_A[kept_assignment],
        tokens_per_expert=load_E.clamp(max=capacity).tolist(),
        kept_top1_T=kept_A[:num_tokens],
        num_assignments=int(load_E.sum()),
        capacity=capacity,
    )
