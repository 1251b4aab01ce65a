"""The sparse MoE layer: route, dispatch to stacked experts (optionally across ranks), combine.

Shape legend: N = all token positions (x.shape[:-1] flattened), T = routed (non-padding) tokens,
D = model dim, F = FFN dim, E = experts (global), L = experts held by this rank, K = top-k,
C = capacity (slots per expert), W = expert-parallel group size, A = kept assignments
(under the grouped kernel followed by spare rows up to a size class, see experts.size_class).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from xmoe.moe.dispatch import capacity_for, dropless_capacity, plan_dispatch
from xmoe.moe.experts import StackedExperts, size_class
from xmoe.moe.parallel import (
    all_reduce_max,
    all_to_all,
    average_expert_grads_over_ranks,
    gather_expert_shards,
    group_rank,
    group_size,
)
from xmoe.moe.routers import make_router


@dataclass
class MoEAux:
    """What a forward returns beside the output. Losses carry gradients; stats are detached."""

    balance_loss: torch.Tensor  # scalar: E * sum_i f_i * P_i (unweighted; the criterion weighs it)
    z_loss: torch.Tensor  # scalar: z_loss_weight * mean(logsumexp(logits)^2)
    expert_index: torch.Tensor  # long, x.shape[:-1]: top-1 expert, -1 for padding and dropped tokens
    routed_index: torch.Tensor  # long, x.shape[:-1]: the router's top-1 choice before capacity, -1 for padding
    stats: dict = field(default_factory=dict)


def renormalized(gates_TK: torch.Tensor) -> torch.Tensor:
    """Each token's chosen gate values divided by their sum, the sum taken as a constant in the
    backward pass.

    NOTE: the chosen experts' outputs are then combined with weights summing to 1, so identical
    experts (an upcycled model at update 0) compute exactly the dense FFN. Differentiating
    through the sum as well would make a top-1 gate the constant 1 and leave the router without
    any gradient from the task loss; with the sum constant, each gate keeps its usual gradient,
    divided by the sum.
    """
    return gates_TK / gates_TK.sum(dim=-1, keepdim=True).detach().clamp(min=torch.finfo(gates_TK.dtype).tiny)


class MoELayer(nn.Module):
    """A sparse FFN: every token goes through its top-k experts, weighted by its gate values.

    Tokens past an expert's capacity get a zero output (the residual connection carries them).
    capacity_factor <= 0 is dropless. eval_capacity_factor=None uses capacity_factor in eval too.
    renormalize_gates: combine the chosen experts with gate values summing to 1 (see renormalized).
    process_group: the expert-parallel group (None = this process holds all experts);
    expert_data_parallel_group: the group of this rank's expert copies when W > E.
    Under expert parallelism, expert gradients get data-parallel semantics (the mean over all
    ranks, like the dense gradients after a DDP all-reduce): see average_expert_grads_over_ranks.
    """

    def __init__(
        self,
        d_model: int,
        d_ffn: int,
        num_experts: int,
        gate: str = "xmoe",
        top_k: int = 1,
        routing_dim: int | None = 16,
        gate_fn: str = "softmax",
        capacity_factor: float = 1.0,
        eval_capacity_factor: float | None = None,
        balance_temperature: float | None = None,
        z_loss_weight: float = 0.0,
        activation: str = "gelu",
        process_group=None,
        expert_data_parallel_group=None,
        normalize: bool = True,
        second_expert_policy: str = "all",
        batch_prioritized: bool = False,
        renormalize_gates: bool = False,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize_gates = renormalize_gates
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = capacity_factor if eval_capacity_factor is None else eval_capacity_factor
        self.z_loss_weight = z_loss_weight
        self.batch_prioritized = batch_prioritized
        self.process_group = process_group
        world = group_size(process_group)
        if num_experts % world:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the expert-parallel size ({world})")
        self.num_local_experts = num_experts // world
        self.first_local_expert = group_rank(process_group) * self.num_local_experts
        self.router = make_router(
            gate, d_model, num_experts, top_k, routing_dim, gate_fn, normalize, balance_temperature, second_expert_policy
        )
        self.experts = StackedExperts(self.num_local_experts, d_model, d_ffn, activation)
        # Which expert kernel: True runs each expert on only the tokens it has
        # (StackedExperts.grouped), False on the capacity-padded (E, C, D) buffer with one batched
        # matmul, which expert parallelism's fixed-size all-to-all always uses. None (default):
        # grouped on CPU, padded on GPU. NOTE: on CPU the grouped kernel measured as fast as the
        # padded one or faster at capacity 1.0 (it skips the empty slots), and dropless pays only
        # for the tokens routed, not for every expert padded to the largest load
        # (docs/performance.md).
        # On GPU the per-expert GEMMs are one kernel launch each and nobody has measured them yet.
        self.grouped_experts: bool | None = None
        average_expert_grads_over_ranks(self.experts, process_group, expert_data_parallel_group)
        # Checkpoints hold all E experts (see full_expert_state_dict); each rank loads its slice,
        # so a checkpoint resumes on any expert-parallel world size.
        self._register_load_state_dict_pre_hook(self._take_local_expert_slice)
        for param in self.experts.parameters():
            # Plain ints (safe to deepcopy/pickle): lets optimizer-state tools slice full tensors.
            param.expert_slice = (self.first_local_expert, self.num_local_experts, num_experts)

    def _take_local_expert_slice(self, state_dict, prefix, *args, **kwargs) -> None:
        if self.num_local_experts == self.num_experts:
            return
        for name, _ in self.experts.named_parameters():
            key = f"{prefix}experts.{name}"
            saved = state_dict.get(key)
            if saved is not None and saved.shape[0] == self.num_experts:
                state_dict[key] = saved[self.first_local_expert : self.first_local_expert + self.num_local_experts]

    def local_expert_slice(self) -> slice:
        """Which of the E experts this rank holds."""
        return slice(self.first_local_expert, self.first_local_expert + self.num_local_experts)

    def full_expert_state_dict(self) -> dict[str, torch.Tensor]:
        """{parameter name in self.experts: (E, ...) tensor with every rank's experts}. Collective."""
        return {
            name: gather_expert_shards(param.detach(), self.process_group)
            for name, param in self.experts.named_parameters()
        }

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEAux]:
        d_model = x.shape[-1]
        x_ND = x.reshape(-1, d_model)
        if padding_mask is None:
            token_rows = None
            x_TD = x_ND
        else:
            token_rows = (~padding_mask.reshape(-1)).nonzero().squeeze(1)  # (T,)
            x_TD = x_ND.index_select(0, token_rows)

        routing = self.router(x_TD)
        gates_TK = renormalized(routing.gates_TK) if self.renormalize_gates else routing.gates_TK
        capacity = self._agreed_capacity(routing.experts_TK, x.device)
        plan = plan_dispatch(routing.experts_TK, gates_TK, self.num_experts, capacity, self.batch_prioritized)

        # Rows of x_ND each kept assignment reads and adds its output to, grouped by expert.
        # NOTE: index_select, not x_ND[rows_A]: its backward is one index_add_, about half the
        # time of advanced indexing's accumulating index_put_ on CPU.
        rows_A = plan.token_index if token_rows is None else token_rows[plan.token_index]
        gate_A = plan.gate
        if self.uses_grouped_kernel(x.device):
            # Spare rows up to a size class (see size_class): they read row 0, no expert computes
            # them, their output is zero and their gate 0, so they add nothing to row 0.
            spare = size_class(rows_A.shape[0]) - rows_A.shape[0]
            rows_A, gate_A = F.pad(rows_A, (0, spare)), F.pad(gate_A, (0, spare))
            # The kernel multiplies each row by its gate (cheaper there, see _GroupedLinear).
            scaled_AD = self.experts.grouped(x_ND.index_select(0, rows_A), plan.tokens_per_expert, gate_A)
        else:
            # Dispatch into capacity slots (empty slots stay zero), run, read the kept slots back.
            buffer_SD = x_ND.new_zeros(self.num_experts * capacity, d_model)
            buffer_SD.index_copy_(0, plan.slot_index, x_ND.index_select(0, rows_A))
            out_ECD = self._run_experts(buffer_SD.view(self.num_experts, capacity, d_model))
            out_AD = out_ECD.reshape(-1, d_model).index_select(0, plan.slot_index)
            scaled_AD = out_AD * gate_A.to(out_AD.dtype).unsqueeze(1)

        # Combine: each kept assignment adds gate * expert output to its token's row.
        y_ND = scaled_AD.new_zeros(x_ND.shape[0], d_model).index_add_(0, rows_A, scaled_AD)
        return y_ND.view(x.shape[:-1] + (d_model,)), self._aux(routing, plan, token_rows, x_ND.shape[0], x.shape[:-1])

    def uses_grouped_kernel(self, device: torch.device) -> bool:
        """Whether forward runs the grouped expert kernel for inputs on `device` (see grouped_experts)."""
        if group_size(self.process_group) > 1:
            return False
        return device.type == "cpu" if self.grouped_experts is None else self.grouped_experts

    def _agreed_capacity(self, experts_TK: torch.Tensor, device: torch.device) -> int:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor <= 0:
            local = dropless_capacity(experts_TK, self.num_experts)
        else:
            local = capacity_for(experts_TK.shape[0], self.num_experts, self.top_k, factor)
        return all_reduce_max(local, self.process_group, device)

    def _run_experts(self, buffer_ECD: torch.Tensor) -> torch.Tensor:
        world = group_size(self.process_group)
        if world == 1:
            return self.experts(buffer_ECD)
        _, capacity, d_model = buffer_ECD.shape
        local = self.num_local_experts
        # Chunk w of the buffer holds this rank's tokens for rank w's experts.
        received_WLCD = all_to_all(buffer_ECD, self.process_group).view(world, local, capacity, d_model)
        expert_in_LXD = received_WLCD.transpose(0, 1).reshape(local, world * capacity, d_model)
        expert_out_LXD = self.experts(expert_in_LXD)
        send_WLCD = expert_out_LXD.view(local, world, capacity, d_model).transpose(0, 1)
        return all_to_all(send_WLCD, self.process_group).view(self.num_experts, capacity, d_model)

    def _aux(self, routing, plan, token_rows, num_positions: int, position_shape) -> MoEAux:
        num_tokens = routing.experts_TK.shape[0]
        top1_T = routing.experts_TK[:, 0]
        # f_i: fraction of routed tokens whose first choice is expert i (not differentiable);
        # P_i: mean router probability (differentiable). Padding never reaches here.
        tokens_per_expert = torch.bincount(top1_T.clamp(min=0), minlength=self.num_experts).float()
        fraction_E = tokens_per_expert / max(num_tokens, 1)
        mean_prob_E = routing.balance_probs_TE.sum(0) / max(num_tokens, 1)
        balance_loss = self.num_experts * (fraction_E * mean_prob_E).sum()
        if self.z_loss_weight > 0 and num_tokens > 0:
            z_loss = self.z_loss_weight * torch.logsumexp(routing.logits_TE, dim=-1).square().mean()
        else:
            z_loss = balance_loss.new_zeros(())

        kept_T = torch.where(plan.kept_top1_T, top1_T, torch.full_like(top1_T, -1))
        expert_index, routed_index = kept_T, top1_T
        if token_rows is not None:
            expert_index = top1_T.new_full((num_positions,), -1).index_copy(0, token_rows, kept_T)
            routed_index = top1_T.new_full((num_positions,), -1).index_copy(0, token_rows, top1_T)
        with torch.no_grad():
            probs_TE = routing.gate_probs_TE
            entropy = -(probs_TE * probs_TE.clamp(min=1e-12).log()).sum(-1).mean() if num_tokens else probs_TE.sum()
            stats = {
                "expert_fraction": fraction_E,
                "dropped_fraction": 1.0 - plan.token_index.numel() / max(plan.num_assignments, 1),
                "gate_entropy": entropy,
                "top_gate_mean": routing.gates_TK[:, 0].mean() if num_tokens else probs_TE.sum(),
                "tau": routing.tau,
                "num_tokens": num_tokens,
                "capacity": plan.capacity,
            }
        return MoEAux(
            balance_loss, z_loss, expert_index.view(position_shape), routed_index.view(position_shape), stats
        )


def freeze_moe(model: nn.Module, router: bool = False, experts: bool = False) -> list[nn.Parameter]:
    """Stop training the routers (projection, expert embeddings, tau) and/or the experts of
    every MoELayer in `model`, by clearing requires_grad. Returns the parameters it froze.

    The paper freezes router and experts at fine-tuning; freezing the router alone from some
    update on during pre-training is the "frozen routing" option. Optimizers skip parameters
    whose grad stays None, so a frozen parameter's value never moves again.
    """
    frozen = []
    for module in model.modules():
        if isinstance(module, MoELayer):
            parts = ([module.router] if router else []) + ([module.experts] if experts else [])
            for part in parts:
                for param in part.parameters():
                    if param.requires_grad:
                        param.requires_grad_(False)
                        param.grad = None
                        frozen.append(param)
    return frozen
