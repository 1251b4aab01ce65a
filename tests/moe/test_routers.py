import copy
import math

import pytest
import torch
import torch.nn.functional as F

from xmoe.moe import LinearRouter, TorchscaleXMoERouter, XMoERouter, make_router
from xmoe.moe.routers import make_finite

D, E = 12, 6


def tokens(n=40, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def brute_force_top_k(scores_TE, k):
    """Reference: repeatedly take the first index of the maximum, excluding earlier picks."""
    picks = []
    for row in scores_TE.tolist():
        chosen = []
        for _ in range(k):
            best = max((v, -i) for i, v in enumerate(row) if i not in chosen)
            chosen.append(-best[1])
        picks.append(chosen)
    return torch.tensor(picks)


@pytest.mark.parametrize("gate_fn", ["softmax", "sigmoid"])
def test_xmoe_top1_equals_brute_force_cosine_argmax(gate_fn):
    router = XMoERouter(D, E, gate_fn=gate_fn)
    x = tokens()
    projected = router.projection(x)
    cosine = torch.tensor(
        [[F.cosine_similarity(p, e, dim=0).item() for e in router.expert_embeddings] for p in projected]
    )
    routing = router(x)
    assert torch.equal(routing.experts_TK, brute_force_top_k(cosine, 1))
    tau = router.tau.item()
    expected_gate = (cosine / tau).softmax(-1).max(-1).values if gate_fn == "softmax" else (cosine.max(-1).values / tau).sigmoid()
    torch.testing.assert_close(routing.gates_TK[:, 0], expected_gate, rtol=1e-4, atol=1e-5)
    # Balance probabilities use the fixed tau0 (0.3 softmax, 0.07 sigmoid), not the learnable tau.
    tau0 = {"softmax": 0.3, "sigmoid": 0.07}[gate_fn]
    torch.testing.assert_close(routing.balance_probs_TE, (cosine / tau0).softmax(-1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("policy", ["all"])
def test_gshard_top2_equals_brute_force_and_renormalizes(policy):
    router = LinearRouter(D, E, top_k=2, second_expert_policy=policy)
    x = tokens()
    logits = x @ router.proj.weight.t()
    routing = router(x)
    assert torch.equal(routing.experts_TK, brute_force_top_k(logits, 2))
    probs = logits.softmax(-1)
    picked = probs.gather(-1, routing.experts_TK)
    torch.testing.assert_close(routing.gates_TK, picked / picked.sum(-1, keepdim=True))
    torch.testing.assert_close(routing.gates_TK.sum(-1), torch.ones(len(x)))


def test_switch_and_switch_sigmoid_top1_equal_brute_force():
    x = tokens()
    for gate in ("switch", "switch_sigmoid"):
        router = make_router(gate, D, E)
        logits = x @ router.proj.weight.t()
        routing = router(x)
        assert torch.equal(routing.experts_TK, brute_force_top_k(logits, 1))
        top = logits.max(-1).values
        expected = top.sigmoid() if gate == "switch_sigmoid" else logits.softmax(-1).max(-1).values
        torch.testing.assert_close(routing.gates_TK[:, 0], expected)


def test_gshard_random_policy_drops_some_second_choices_in_training_only():
    torch.manual_seed(0)
    router = LinearRouter(D, E, top_k=2, second_expert_policy="random")
    x = tokens(400)
    routing = router(x)
    dropped = routing.experts_TK[:, 1] < 0
    assert 0 < dropped.sum() < len(x)
    assert torch.all(routing.gates_TK[dropped, 1] == 0)
    router.eval()
    assert (router(x).experts_TK >= 0).all()


def test_torchscale_router_reproduces_the_authors_formula_on_a_handmade_example():
    router = TorchscaleXMoERouter(d_model=2, num_experts=2, routing_dim=2)
    with torch.no_grad():
        router.projection.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        router.expert_embeddings.copy_(torch.tensor([[3.0, 4.0], [0.0, -2.0]]))
    x = torch.tensor([[1.0, 1.0]])
    # W h = (1, 2), NOT normalized; experts normalized: (0.6, 0.8) and (0, -1).
    # logits = (1*0.6 + 2*0.8, -2) = (2.2, -2.0); gate = softmax(logits), no temperature.
    routing = router(x)
    torch.testing.assert_close(routing.logits_TE, torch.tensor([[2.2, -2.0]]))
    assert routing.experts_TK.tolist() == [[0]]
    expected_gate = math.exp(2.2) / (math.exp(2.2) + math.exp(-2.0))
    assert routing.gates_TK.item() == pytest.approx(expected_gate, rel=1e-6)
    torch.testing.assert_close(routing.balance_probs_TE, routing.logits_TE.softmax(-1))
    assert math.isnan(routing.tau)


def test_xmoe_scores_stay_within_plus_minus_one_over_tau():
    router = XMoERouter(D, E)
    with torch.no_grad():
        router.tau.fill_(0.25)
    logits = router(tokens(200) * 100).logits_TE
    assert logits.abs().max() <= 1 / 0.25 + 1e-5
    assert logits.abs().max() > 0.5 / 0.25  # not trivially small


def test_tau_is_clamped_at_1e_minus_4():
    router = XMoERouter(D, E)
    with torch.no_grad():
        router.tau.fill_(-3.0)
    routing = router(tokens())
    assert routing.tau.item() == pytest.approx(1e-4)
    assert torch.isfinite(routing.logits_TE).all()


@pytest.mark.parametrize("gate_fn", ["softmax", "sigmoid"])
def test_gradients_reach_projection_expert_embeddings_and_tau(gate_fn):
    router = XMoERouter(D, E, gate_fn=gate_fn)
    routing = router(tokens())
    (routing.gates_TK.sum() + routing.balance_probs_TE[:, 0].sum()).backward()
    for name in ("projection.weight", "expert_embeddings", "tau"):
        grad = dict(router.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_no_dimension_reduction_and_no_normalization_ablations():
    no_reduction = XMoERouter(D, E, routing_dim=None)
    assert no_reduction.expert_embeddings.shape == (E, D)
    assert not list(no_reduction.projection.parameters())
    x = tokens()
    expected = F.normalize(x, dim=-1) @ F.normalize(no_reduction.expert_embeddings, dim=-1).t()
    torch.testing.assert_close(no_reduction(x).logits_TE, expected / 0.07)

    unnormalized = XMoERouter(D, E, normalize=False)
    raw = unnormalized.projection(x) @ unnormalized.expert_embeddings.t()
    torch.testing.assert_close(unnormalized(x).logits_TE, raw / 0.07)


def test_router_math_is_fp32_under_bf16_autocast():
    router = XMoERouter(D, E)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(tokens().bfloat16())
    assert routing.logits_TE.dtype == torch.float32
    assert routing.gates_TK.dtype == torch.float32


def test_non_finite_scores_are_replaced_so_assignment_still_works():
    scores = torch.tensor([[float("nan"), 1.0, float("inf")], [-2.0, float("-inf"), 0.5]])
    fixed = make_finite(scores)
    assert torch.isfinite(fixed).all()
    assert fixed.tolist() == [[-2.0, 1.0, -2.0], [-2.0, -2.0, 0.5]]
    assert make_finite(torch.full((2, 2), float("nan"))).eq(0).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gate="nope"), "unknown gate 'nope'"),
        (dict(gate="gshard", top_k=1), "set top_k=2"),
        (dict(gate="xmoe", gate_fn="tanh"), "gate_fn must be one of"),
        (dict(gate="xmoe", top_k=9), "top_k must be in"),
    ],
)
def test_bad_router_options_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_router(d_model=D, num_experts=E, **kwargs)


HALF_DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("gate", ["xmoe", "xmoe_torchscale", "switch", "switch_sigmoid", "gshard"])
def test_casting_to_half_precision_keeps_the_router_in_fp32_and_routes_as_in_fp32(gate, dtype):
    # What fairseq's --fp16 / --bf16 trainers do to the whole model: model.half() / .to(bfloat16).
    router = make_router(gate, D, E, top_k=2 if gate == "gshard" else 1)
    reference = copy.deepcopy(router)
    router.to(dtype)
    assert all(p.dtype == torch.float32 for p in router.parameters())
    for name, param in router.named_parameters():
        assert torch.equal(param, dict(reference.named_parameters())[name]), name  # not rounded on the way
    x = tokens().to(dtype)  # the layer's input arrives in half precision
    routing, expected = router(x), reference(x.float())
    assert torch.equal(routing.experts_TK, expected.experts_TK)
    torch.testing.assert_close(routing.gates_TK, expected.gates_TK, rtol=0, atol=0)
    assert routing.logits_TE.dtype == torch.float32
    (routing.gates_TK.sum() + routing.balance_probs_TE.square().sum()).backward()
    for name, param in router.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_other_casts_and_half_weights_still_work():
    router = XMoERouter(D, E).half()
    assert router.to(torch.float64).tau.dtype == torch.float64  # only the cast down to 16 bits is skipped
    # Weights that arrive in half precision anyway (a router built under a half default dtype)
    # are cast up inside forward; their gradients come back in their own dtype.
    half = XMoERouter(D, E)
    for param in half.parameters():
        param.data = param.data.bfloat16()
    routing = half(tokens().bfloat16())
    assert routing.logits_TE.dtype == torch.float32
    rounded = XMoERouter(D, E)
    rounded.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    torch.testing.assert_close(routing.logits_TE, rounded(tokens().bfloat16().float()).logits_TE)
    routing.gates_TK.sum().backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in half.parameters())
