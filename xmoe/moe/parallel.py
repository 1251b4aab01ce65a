"""Expert parallelism over torch.distributed (NCCL on GPU, gloo on CPU).

Layout for a world of W ranks and N experts:
- W <= N (N % W == 0): one expert-parallel (EP) group of all W ranks; rank r holds experts
  [r * N/W, (r + 1) * N/W). Tokens travel to their expert's rank and back by all-to-all.
- W > N (W % N == 0): W/N EP groups of N consecutive ranks, each rank holding one expert.
  The copies of expert i (ranks i, i + N, i + 2N, ...) form an expert-data-parallel (EDP)
  group whose gradients are summed (see `average_expert_grads_over_ranks`).

NOTE: every all-to-all moves a fixed (E, C, D) buffer whose capacity C is agreed on by an
all-reduce(MAX) first, so ranks holding different numbers of tokens still issue identical
collectives and no rank can hang.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

_GROUP_CACHE: dict[tuple[int, int], tuple] = {}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def expert_parallel_groups(num_experts: int):
    """(ep_group, edp_group) for this rank, or (None, None) when not distributed or W == 1.

    Every rank must call this with the same num_experts (group creation is collective).
    Groups are created once per (world size, num_experts) and cached.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return None, None
    world, rank = dist.get_world_size(), dist.get_rank()
    key = (world, num_experts)
    if key not in _GROUP_CACHE:
        if world <= num_experts:
            if num_experts % world:
                raise ValueError(
                    f"expert parallelism needs num_experts ({num_experts}) divisible by the world size ({world})"
                )
            _GROUP_CACHE[key] = (dist.new_group(list(range(world))), None)
        else:
            if world % num_experts:
                raise ValueError(
                    f"with more ranks than experts the world size ({world}) must be a multiple of "
                    f"num_experts ({num_experts})"
                )
            ep_groups = [dist.new_group(list(range(g, g + num_experts))) for g in range(0, world, num_experts)]
            edp_groups = [dist.new_group(list(range(i, world, num_experts))) for i in range(num_experts)]
            _GROUP_CACHE[key] = (ep_groups[rank // num_experts], edp_groups[rank % num_experts])
    return _GROUP_CACHE[key]


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce_max(value: int, group, device: torch.device) -> int:
    """The largest `value` over the group (an int agreed on by every rank)."""
    if group is None or group_size(group) == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return int(tensor.item())


def all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Split dim 0 into group-size equal chunks; chunk i goes to rank i. Differentiable."""
    if group_size(group) == 1:
        return x
    x = x.contiguous()
    return dist_fn.all_to_all_single(torch.empty_like(x), x, group=group)


def gather_expert_shards(local: torch.Tensor, ep_group) -> torch.Tensor:
    """Concatenate every EP rank's (L, ...) shard along dim 0 into the full (E, ...) tensor.

    Collective: every rank of the group must call it, in the same order.
    """
    world = group_size(ep_group)
    if world == 1:
        return local
    shards = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(shards, local.contiguous(), group=ep_group)
    return torch.cat(shards, dim=0)


def average_expert_grads_over_ranks(module: nn.Module, ep_group, edp_group) -> None:
    """Give expert gradients data-parallel (mean over ranks) semantics during backward.

    After the all-to-all backward, an expert's gradient holds the contributions of every token
    of its EP group. DDP wrappers (fairseq's legacy_ddp included) skip `.expert` parameters but
    average the dense ones over the W ranks, so here each expert gradient is divided by W and,
    when experts are replicated (W > E), summed over its copies (the EDP group). The result is
    (1/W) * sum over all ranks' tokens, exactly what the dense parameters get.

    NOTE: a tensor hook, not a post-accumulate hook, so it sees only this backward's contribution
    and gradient accumulation over several backward passes stays correct.
    """
    world = group_size(ep_group) * group_size(edp_group)
    if world == 1:
        return

    def average(grad: torch.Tensor) -> torch.Tensor:
        grad = grad / world
        if group_size(edp_group) > 1:
            dist.all_reduce(grad, group=edp_group)
        return grad

    for param in module.parameters():
        param.register_hook(average)
