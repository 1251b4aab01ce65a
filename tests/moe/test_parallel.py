"""Expert parallelism over gloo: W processes must compute what one process holding every expert
computes on the same global tokens, in outputs and in gradients."""

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xmoe.moe import MoELayer, expert_parallel_groups

D, FF = 8, 16
pytestmark = pytest.mark.multiprocess


def tokens_of_rank(rank: int, counts: list[int]) -> torch.Tensor:
    return torch.randn(counts[rank], D, generator=torch.Generator().manual_seed(100 + rank))


def build_layer(num_experts, capacity_factor, **kwargs):
    torch.manual_seed(0)  # same router and expert weights in every process
    return MoELayer(D, FF, num_experts, gate="xmoe", capacity_factor=capacity_factor, **kwargs)


def _worker(rank, world, store_path, num_experts, counts, capacity_factor):
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        # Reference: one process, all experts, every rank's tokens.
        reference = build_layer(num_experts, capacity_factor)
        all_x = [tokens_of_rank(r, counts) for r in range(world)]
        x_ref = torch.cat(all_x).requires_grad_()
        y_ref, _ = reference(x_ref)
        upstream = torch.cat([torch.ones(c, D) * (r + 1) for r, c in enumerate(counts)])
        (y_ref * upstream).sum().backward()

        ep_group, edp_group = expert_parallel_groups(num_experts)
        layer = build_layer(
            num_experts, capacity_factor, process_group=ep_group, expert_data_parallel_group=edp_group
        )
        local, first = layer.num_local_experts, layer.first_local_expert
        with torch.no_grad():
            for name, param in layer.experts.named_parameters():
                param.copy_(getattr(reference.experts, name)[first : first + local])
        x = all_x[rank].clone().requires_grad_()
        y, aux = layer(x)
        (y * upstream[sum(counts[:rank]) : sum(counts[: rank + 1])]).sum().backward()

        offset = sum(counts[:rank])
        torch.testing.assert_close(y, y_ref[offset : offset + counts[rank]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.grad, x_ref.grad[offset : offset + counts[rank]], atol=1e-5, rtol=1e-5)
        # Data-parallel semantics: every gradient is the mean over ranks of the local losses'
        # gradients = (reference gradient of the summed loss) / world.
        for name, param in layer.experts.named_parameters():
            expected = getattr(reference.experts, name).grad[first : first + local] / world
            torch.testing.assert_close(param.grad, expected, atol=1e-6, rtol=1e-5, msg=name)
        for name, param in layer.router.named_parameters():
            grad = param.grad.clone()
            dist.all_reduce(grad)  # the dense-gradient all-reduce a DDP wrapper would do...
            grad /= world  # ...and its averaging
            expected = dict(reference.router.named_parameters())[name].grad / world
            torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5, msg=name)
        assert aux.stats["num_tokens"] == counts[rank]

        # A checkpoint gathers every rank's experts; loading it anywhere takes the local slice.
        full = layer.full_expert_state_dict()
        for name, tensor in full.items():
            torch.testing.assert_close(tensor, getattr(reference.experts, name).detach(), rtol=0, atol=0)
        state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
        fresh = build_layer(num_experts, capacity_factor, process_group=ep_group, expert_data_parallel_group=edp_group)
        with torch.no_grad():
            for param in fresh.experts.parameters():
                param.zero_()
        fresh.load_state_dict(state)
        for name, param in fresh.experts.named_parameters():
            assert torch.equal(param, getattr(reference.experts, name)[layer.local_expert_slice()]), name
    finally:
        dist.destroy_process_group()


def run_workers(tmp_path, world, *args, timeout=120):
    store_path = str(tmp_path / "store")
    context = mp.start_processes(
        _worker, args=(world, store_path) + args, nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"expert-parallel workers did not finish within {timeout}s (hang?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, 9)
                process.join()


@pytest.mark.parametrize(
    "num_experts, counts",
    [
        (4, [12, 12]),  # W=2 <= N=4: two experts per rank
        (4, [15, 3]),  # different token counts per rank must not hang
        (1, [9, 5]),  # W=2 > N=1: the expert is replicated, gradients reduced over its copies
    ],
)
def test_two_process_gloo_matches_one_process_with_all_experts(tmp_path, num_experts, counts):
    run_workers(tmp_path, 2, num_experts, counts, 0.0)


def test_a_rank_without_tokens_and_capacity_routing_do_not_hang(tmp_path):
    # Capacity is agreed on by all ranks; with ample capacity nothing is dropped, so the result
    # still equals the single-process reference.
    run_workers(tmp_path, 2, 2, [11, 0], 8.0)
