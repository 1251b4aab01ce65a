import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xmoe.moe import MoELayer, freeze_moe

D, FF = 16, 32


def x_BTD(b=3, t=7, seed=0):
    return torch.randn(b, t, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("gate", ["xmoe", "switch", "xmoe_torchscale"])
def test_one_expert_moe_equals_dense_ffn_in_outputs_and_gradients(gate):
    torch.manual_seed(0)
    moe = MoELayer(D, FF, num_experts=1, gate=gate, capacity_factor=1.0)
    dense = nn.Sequential(nn.Linear(D, FF), nn.GELU(), nn.Linear(FF, D))
    with torch.no_grad():
        dense[0].weight.copy_(moe.experts.w1_EDF[0].t())
        dense[0].bias.copy_(moe.experts.b1_EF[0])
        dense[2].weight.copy_(moe.experts.w2_EFD[0].t())
        dense[2].bias.copy_(moe.experts.b2_ED[0])
    x_moe = x_BTD().requires_grad_()
    x_dense = x_moe.detach().clone().requires_grad_()
    y_moe, aux = moe(x_moe)
    y_dense = dense(x_dense)
    torch.testing.assert_close(y_moe, y_dense, atol=1e-5, rtol=1e-5)
    assert aux.stats["dropped_fraction"] == 0.0

    upstream = torch.randn_like(y_dense)
    (y_moe * upstream).sum().backward()
    (y_dense * upstream).sum().backward()
    torch.testing.assert_close(x_moe.grad, x_dense.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.experts.w1_EDF.grad[0], dense[0].weight.grad.t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.experts.b1_EF.grad[0], dense[0].bias.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.experts.w2_EFD.grad[0], dense[2].weight.grad.t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.experts.b2_ED.grad[0], dense[2].bias.grad, atol=1e-5, rtol=1e-5)


def reference_moe(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """Per-token loop: sum of gate * expert(x) over the token's kept choices."""
    routing = layer.router(x_TD)
    experts = layer.experts
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(routing.experts_TK.shape[1]):
            e = int(routing.experts_TK[t, k])
            hidden = experts.activation(x_TD[t] @ experts.w1_EDF[e] + experts.b1_EF[e])
            out[t] += routing.gates_TK[t, k] * (hidden @ experts.w2_EFD[e] + experts.b2_ED[e])
    return out


@pytest.mark.parametrize("gate, top_k", [("xmoe", 1), ("switch_sigmoid", 1), ("gshard", 2)])
def test_dropless_output_equals_a_per_token_reference(gate, top_k):
    torch.manual_seed(1)
    layer = MoELayer(D, FF, num_experts=4, gate=gate, top_k=top_k, capacity_factor=0.0)
    x = x_BTD().reshape(-1, D)
    y, aux = layer(x)
    torch.testing.assert_close(y, reference_moe(layer, x), atol=1e-5, rtol=1e-5)
    assert aux.stats["dropped_fraction"] == 0.0
    assert (aux.expert_index >= 0).all()


def test_tokens_past_capacity_get_zero_output_and_index_minus_one():
    torch.manual_seed(2)
    layer = MoELayer(D, FF, num_experts=4, gate="switch", capacity_factor=0.5)
    x = x_BTD(b=2, t=16).reshape(-1, D)
    y, aux = layer(x)
    choice = layer.router(x).experts_TK[:, 0]
    capacity = aux.stats["capacity"]
    assert capacity == 4  # ceil(0.5 * 32 / 4)
    reference = reference_moe(layer, x)
    for expert in range(4):
        tokens = (choice == expert).nonzero().squeeze(1).tolist()
        kept, dropped = tokens[:capacity], tokens[capacity:]
        assert aux.expert_index[kept].eq(expert).all()
        assert aux.expert_index[dropped].eq(-1).all()
        assert y[dropped].eq(0).all()
        torch.testing.assert_close(y[kept], reference[kept], atol=1e-5, rtol=1e-5)
    assert torch.equal(aux.routed_index, choice)  # the router's choice, before capacity
    dropped_total = int((aux.expert_index == -1).sum())
    assert dropped_total > 0
    assert aux.stats["dropped_fraction"] == pytest.approx(dropped_total / 32)


def test_eval_capacity_factor_applies_in_eval_mode_only():
    layer = MoELayer(D, FF, num_experts=4, gate="switch", capacity_factor=0.25, eval_capacity_factor=0.0)
    x = x_BTD(b=4, t=8).reshape(-1, D)
    assert layer(x)[1].stats["dropped_fraction"] > 0
    layer.eval()
    assert layer(x)[1].stats["dropped_fraction"] == 0.0


def test_padding_is_never_routed_and_changes_no_loss():
    torch.manual_seed(3)
    layer = MoELayer(D, FF, num_experts=4, gate="xmoe", capacity_factor=0.0, z_loss_weight=0.1)
    x = x_BTD(b=2, t=6)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    y, aux = layer(x, padding)
    assert aux.expert_index[padding].eq(-1).all()
    assert aux.routed_index[padding].eq(-1).all()
    assert aux.expert_index[~padding].ge(0).all()
    assert y[padding].eq(0).all()
    assert aux.stats["num_tokens"] == 10

    # Different garbage in the padded positions changes nothing.
    x_other = x.clone()
    x_other[padding] = 1e3 * torch.randn(2, D)
    y_other, aux_other = layer(x_other, padding)
    torch.testing.assert_close(y_other, y)
    torch.testing.assert_close(aux_other.balance_loss, aux.balance_loss)
    torch.testing.assert_close(aux_other.z_loss, aux.z_loss)

    # Same losses as routing the 10 real tokens alone.
    _, aux_real = layer(x[~padding])
    torch.testing.assert_close(aux_real.balance_loss, aux.balance_loss)
    torch.testing.assert_close(aux_real.z_loss, aux.z_loss)
    torch.testing.assert_close(aux_real.stats["expert_fraction"], aux.stats["expert_fraction"])


def test_balance_loss_is_eq8_with_fixed_temperature():
    layer = MoELayer(D, FF, num_experts=4, gate="xmoe", gate_fn="sigmoid")
    x = x_BTD().reshape(-1, D)
    _, aux = layer(x)
    router = layer.router
    cosine = F.normalize(router.projection(x), dim=-1) @ F.normalize(router.expert_embeddings, dim=-1).t()
    fraction = torch.bincount(cosine.argmax(-1), minlength=4).float() / len(x)
    mean_prob = (cosine / 0.07).softmax(-1).mean(0)
    torch.testing.assert_close(aux.balance_loss, 4 * (fraction * mean_prob).sum())
    # A perfectly uniform router would give exactly 1.
    assert aux.balance_loss.item() >= 0


def test_balance_and_z_loss_gradients_reach_the_router_only():
    layer = MoELayer(D, FF, num_experts=4, gate="xmoe", z_loss_weight=1e-2)
    _, aux = layer(x_BTD())
    (aux.balance_loss + aux.z_loss).backward()
    assert layer.router.expert_embeddings.grad.abs().sum() > 0
    assert layer.router.tau.grad is not None and layer.router.tau.grad.abs() > 0
    assert layer.experts.w1_EDF.grad is None


def test_expert_parameters_carry_the_expert_flag_and_router_does_not():
    layer = MoELayer(D, FF, num_experts=4)
    assert all(getattr(p, "expert", False) for p in layer.experts.parameters())
    assert not any(getattr(p, "expert", False) for p in layer.router.parameters())


def test_stats_are_detached_and_describe_the_routing():
    layer = MoELayer(D, FF, num_experts=4, capacity_factor=0.0)
    _, aux = layer(x_BTD())
    stats = aux.stats
    assert stats["expert_fraction"].shape == (4,)
    assert stats["expert_fraction"].sum().item() == pytest.approx(1.0)
    assert 0 <= stats["gate_entropy"].item() <= torch.log(torch.tensor(4.0)).item() + 1e-6
    assert 0 < stats["top_gate_mean"].item() <= 1
    assert stats["tau"].item() == pytest.approx(0.07)
    assert not any(torch.is_tensor(v) and v.requires_grad for v in stats.values())


@pytest.mark.parametrize("grouped", [False, True], ids=["padded", "grouped"])
def test_bf16_autocast_forward_and_backward_run(grouped):
    layer = MoELayer(D, FF, num_experts=4)
    layer.grouped_experts = grouped
    x = x_BTD().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
    (y.float().sum() + aux.balance_loss).backward()
    assert torch.isfinite(x.grad).all()
    assert layer.router.tau.grad is not None
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in layer.experts.parameters())


def test_empty_input_gives_empty_output_and_zero_losses():
    layer = MoELayer(D, FF, num_experts=4)
    x = x_BTD(b=1, t=3)
    y, aux = layer(x, torch.ones(1, 3, dtype=torch.bool))
    assert y.eq(0).all()
    assert aux.balance_loss.item() == 0.0
    assert aux.expert_index.eq(-1).all()


def test_freeze_moe_freezes_router_and_or_experts_only():
    model = nn.ModuleDict({"moe": MoELayer(D, FF, num_experts=4), "other": nn.Linear(D, D)})
    frozen = freeze_moe(model, router=True)
    assert {id(p) for p in frozen} == {id(p) for p in model["moe"].router.parameters()}
    assert all(p.requires_grad for p in model["moe"].experts.parameters())
    freeze_moe(model, experts=True)
    assert not any(p.requires_grad for p in model["moe"].parameters())
    assert all(p.requires_grad for p in model["other"].parameters())
    y, aux = model["moe"](x_BTD())
    assert not y.requires_grad and not aux.balance_loss.requires_grad


def _identical_experts(layer: MoELayer) -> None:
    with torch.no_grad():
        for param in layer.experts.parameters():
            param.copy_(param[:1].expand_as(param))


@pytest.mark.parametrize("gate, gate_fn, top_k", [("xmoe", "softmax", 1), ("xmoe", "sigmoid", 1), ("xmoe", "softmax", 2)])
def test_renormalized_gates_make_identical_experts_compute_one_expert_exactly(gate, gate_fn, top_k):
    torch.manual_seed(2)
    layer = MoELayer(D, FF, num_experts=4, gate=gate, gate_fn=gate_fn, top_k=top_k, capacity_factor=0.0)
    _identical_experts(layer)
    x = x_BTD().reshape(-1, D)
    one_expert = layer.experts(x.expand(4, *x.shape))[0]  # (T, D) through expert 0 (all are equal)
    scaled, _ = layer(x)
    assert not torch.allclose(scaled, one_expert, atol=1e-3)  # the gate values scale the output
    layer.renormalize_gates = True
    y, aux = layer(x)
    assert aux.routed_index.unique().numel() > 1
    torch.testing.assert_close(y, one_expert, rtol=0, atol=1e-6)


def test_renormalized_top1_gate_still_passes_the_task_gradient_to_the_router():
    torch.manual_seed(3)
    layer = MoELayer(D, FF, num_experts=4, gate="xmoe", capacity_factor=0.0, renormalize_gates=True)
    x = x_BTD().reshape(-1, D)
    upstream = torch.randn(x.shape[0], D, generator=torch.Generator().manual_seed(4))
    y, _ = layer(x)
    (y * upstream).sum().backward()
    renormalized_grad = layer.router.tau.grad.clone()
    # d/dtheta of g / sg(g) = (dg/dtheta) / g: the gate-scaled layer's gradient, token by token
    # divided by the gate value. Check it on tau against that layer with gates divided by a constant.
    layer.zero_grad()
    layer.renormalize_gates = False
    with torch.no_grad():
        gates_T = layer.router(x).gates_TK[:, 0]
    y_scaled, _ = layer(x)
    (y_scaled / gates_T.unsqueeze(1) * upstream).sum().backward()
    assert renormalized_grad.abs() > 0
    torch.testing.assert_close(renormalized_grad, layer.router.tau.grad, rtol=1e-4, atol=1e-7)


def float64_reference(layer: MoELayer, x_TD: torch.Tensor, capacity: int) -> torch.Tensor:
    """Token by token in float64, with the layer's own routing: first choices take an expert's
    `capacity` slots in token order, then second choices; gate * expert(x) summed over the kept."""
    routing = layer.router(x_TD)
    experts = layer.experts
    w1, b1, w2, b2 = (p.double() for p in (experts.w1_EDF, experts.b1_EF, experts.w2_EFD, experts.b2_ED))
    x64 = x_TD.double()
    rows = [torch.zeros_like(x64[0]) for _ in range(x_TD.shape[0])]
    used = [0] * layer.num_experts
    for k in range(routing.experts_TK.shape[1]):
        for t in range(x_TD.shape[0]):
            e = int(routing.experts_TK[t, k])
            if used[e] == capacity:
                continue
            used[e] += 1
            hidden = experts.activation(x64[t] @ w1[e] + b1[e])
            rows[t] = rows[t] + routing.gates_TK[t, k].double() * (hidden @ w2[e] + b2[e])
    return torch.stack(rows)


@pytest.mark.parametrize("grouped", [False, True], ids=["padded", "grouped"])
@pytest.mark.parametrize(
    "gate, top_k, capacity_factor", [("xmoe", 1, 1.0), ("switch", 1, 0.5), ("gshard", 2, 1.0), ("xmoe", 1, 0.0)]
)
def test_both_kernels_match_a_float64_reference_in_outputs_and_all_gradients(gate, top_k, capacity_factor, grouped):
    torch.manual_seed(5)
    layer = MoELayer(D, FF, num_experts=4, gate=gate, top_k=top_k, capacity_factor=capacity_factor)
    layer.grouped_experts = grouped
    reference = copy.deepcopy(layer)
    x = x_BTD(b=2, t=12, seed=6).reshape(-1, D).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))

    y, aux = layer(x)
    assert aux.stats["dropped_fraction"] > 0 or capacity_factor == 0.0
    y_ref = float64_reference(reference, x_ref, aux.stats["capacity"])
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6)

    (y * upstream).sum().backward()
    (y_ref * upstream.double()).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for (name, param), ref_param in zip(layer.named_parameters(), reference.parameters()):
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, ref_param.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_grouped_and_padded_kernels_agree_with_padding_positions():
    torch.manual_seed(8)
    layer = MoELayer(D, FF, num_experts=4, gate="xmoe", capacity_factor=1.0)
    x = x_BTD(b=2, t=9, seed=9)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[0, 6:] = True
    results = []
    for grouped in (True, False):
        layer.grouped_experts = grouped
        layer.zero_grad()
        x_in = x.clone().requires_grad_()
        y, aux = layer(x_in, padding)
        (y * x).sum().backward()
        results.append((y, x_in.grad, [p.grad.clone() for p in layer.parameters()], aux.expert_index))
    (y, grad_x, grads, index), (y_pad, grad_x_pad, grads_pad, index_pad) = results
    assert torch.equal(index, index_pad) and index.eq(-1).any()
    torch.testing.assert_close(y, y_pad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x, grad_x_pad, rtol=1e-5, atol=1e-5)
    for grad, grad_pad in zip(grads, grads_pad):
        torch.testing.assert_close(grad, grad_pad, rtol=1e-5, atol=1e-5)


def test_the_default_kernel_is_grouped_on_cpu_and_padded_on_gpu(monkeypatch):
    layer = MoELayer(D, FF, num_experts=4)
    assert layer.grouped_experts is None
    assert layer.uses_grouped_kernel(torch.device("cpu"))
    assert not layer.uses_grouped_kernel(torch.device("cuda"))
    calls = []
    for kernel in ("grouped", "forward"):
        original = getattr(layer.experts, kernel)
        monkeypatch.setattr(layer.experts, kernel, lambda *a, _k=kernel, _f=original: calls.append(_k) or _f(*a))
    layer(x_BTD())
    assert calls == ["grouped"]
    layer.grouped_experts = False
    assert not layer.uses_grouped_kernel(torch.device("cpu"))
    layer(x_BTD())
    assert calls == ["grouped", "forward"]
