import copy

import pytest
import torch

from xmoe.moe import StackedExperts
from xmoe.moe import experts as experts_module
from xmoe.moe.experts import grouped_linear, onednn_linear_available, size_class


def reference_grouped_linear(x_AI, w_EIO, b_EO, tokens_per_expert):
    """In float64, with each row's own copy of its expert's weights: x[a] @ w[e(a)] + b[e(a)]."""
    expert_A = torch.repeat_interleave(torch.arange(len(tokens_per_expert)), torch.tensor(tokens_per_expert))
    x_AI, w_EIO, b_EO = x_AI.double(), w_EIO.double(), b_EO.double()
    return torch.einsum("ai,aio->ao", x_AI, w_EIO[expert_A]) + b_EO[expert_A]


@pytest.mark.parametrize("tokens_per_expert", [[3, 0, 5, 1], [0, 0, 0, 0], [9, 0, 0, 0]])
def test_grouped_linear_matches_a_float64_reference_in_outputs_and_gradients(tokens_per_expert):
    generator = torch.Generator().manual_seed(0)
    num_rows = sum(tokens_per_expert)
    x = torch.randn(num_rows, 6, generator=generator, requires_grad=True)
    w = torch.randn(4, 6, 5, generator=generator, requires_grad=True)
    b = torch.randn(4, 5, generator=generator, requires_grad=True)
    upstream = torch.randn(num_rows, 5, generator=generator)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]

    y = grouped_linear(x, w, b, tokens_per_expert)
    y_ref = reference_grouped_linear(*leaves, tokens_per_expert)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-6, atol=1e-6)

    (y * upstream).sum().backward()
    (y_ref * upstream.double()).sum().backward()
    for name, param, ref in zip("xwb", (x, w, b), leaves):
        torch.testing.assert_close(param.grad.double(), ref.grad, rtol=1e-6, atol=1e-6, msg=name)
    empty = [e for e, count in enumerate(tokens_per_expert) if count == 0]
    assert w.grad[empty].eq(0).all() and b.grad[empty].eq(0).all()


def test_grouped_experts_equal_the_padded_experts_on_the_same_tokens():
    torch.manual_seed(0)
    experts = StackedExperts(3, 8, 12, activation="gelu")
    tokens_per_expert = [4, 0, 2]
    x_AD = torch.randn(6, 8)
    padded_ECD = torch.zeros(3, 4, 8)  # capacity 4, empty slots zero
    padded_ECD[0, :4], padded_ECD[2, :2] = x_AD[:4], x_AD[4:]
    expected = torch.cat([experts(padded_ECD)[0, :4], experts(padded_ECD)[2, :2]])
    torch.testing.assert_close(experts.grouped(x_AD, tokens_per_expert), expected, rtol=1e-6, atol=1e-6)


def test_grouped_linear_under_bf16_autocast_computes_in_bf16_and_returns_fp32_gradients():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, generator=generator, requires_grad=True)
    w = torch.randn(2, 6, 4, generator=generator, requires_grad=True)
    b = torch.randn(2, 4, generator=generator, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_linear(x, w, b, [2, 3])
    assert y.dtype == torch.bfloat16
    y_ref = reference_grouped_linear(x.detach(), w.detach(), b.detach(), [2, 3])
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=5e-2)
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(b.grad, torch.tensor([[2.0] * 4, [3.0] * 4]))


def _train_step(experts: StackedExperts, x_ECD: torch.Tensor, grouped: bool) -> None:
    if grouped:
        out = experts.grouped(x_ECD.reshape(-1, x_ECD.shape[-1]), [x_ECD.shape[1]] * experts.num_experts)
    else:
        out = experts(x_ECD)
    (out * out).sum().backward()


def _experts_after_one_step(seed: int, grouped: bool) -> tuple[StackedExperts, torch.Tensor]:
    """3 experts (8 -> 12 -> 8) after one backward on a (3, 4, 8) input, and that input."""
    torch.manual_seed(seed)
    experts, x_ECD = StackedExperts(3, 8, 12), torch.randn(3, 4, 8)
    _train_step(experts, x_ECD, grouped)
    return experts, x_ECD


@pytest.mark.parametrize("grouped", [False, True], ids=["padded", "grouped"])
def test_weight_gradients_reuse_their_memory_once_the_previous_gradient_is_freed(grouped):
    experts, x_ECD = _experts_after_one_step(2, grouped)
    first = {name: p.grad.clone() for name, p in experts.named_parameters()}
    address = experts.w1_EDF.grad.data_ptr(), experts.w2_EFD.grad.data_ptr()
    experts.zero_grad(set_to_none=True)

    _train_step(experts, x_ECD, grouped)
    assert (experts.w1_EDF.grad.data_ptr(), experts.w2_EFD.grad.data_ptr()) == address
    assert experts.w1_EDF.grad.data_ptr() == experts.grad_w1_memory.kept.data_ptr()
    assert experts.w2_EFD.grad.data_ptr() == experts.grad_w2_memory.kept.data_ptr()
    for name, param in experts.named_parameters():
        assert torch.equal(param.grad, first[name]), name


@pytest.mark.parametrize("grouped", [False, True], ids=["padded", "grouped"])
def test_weight_gradients_accumulate_and_kept_old_gradients_stay_unchanged(grouped):
    experts, x_ECD = _experts_after_one_step(3, grouped)
    single = experts.w1_EDF.grad.clone()
    experts.zero_grad(set_to_none=True)

    for _ in range(3):  # gradient accumulation: .grad is never freed in between
        _train_step(experts, x_ECD, grouped)
    torch.testing.assert_close(experts.w1_EDF.grad, 3 * single)

    kept = experts.w1_EDF.grad  # a caller keeps the old gradient after the loop drops .grad
    experts.zero_grad(set_to_none=True)
    _train_step(experts, 2 * x_ECD, grouped)
    torch.testing.assert_close(kept, 3 * single, rtol=0, atol=0)
    assert experts.w1_EDF.grad.data_ptr() != kept.data_ptr()
    assert not torch.allclose(experts.w1_EDF.grad, single)


def test_a_copied_module_does_not_carry_the_gradient_memory():
    experts = StackedExperts(2, 4, 6)
    _train_step(experts, torch.randn(2, 3, 4), grouped=False)
    assert experts.grad_w1_memory.kept is not None
    assert copy.deepcopy(experts).grad_w1_memory.kept is None


@pytest.mark.parametrize("grouped", [False, True], ids=["padded", "grouped"])
def test_off_cpu_weight_gradients_are_allocated_as_usual(grouped):
    # CUDA's caching allocator already reuses memory; the meta device stands in for it here.
    experts = StackedExperts(2, 4, 6).to("meta")
    _train_step(experts, torch.randn(2, 3, 4, device="meta"), grouped)
    assert experts.w1_EDF.grad.device.type == "meta" and experts.w1_EDF.grad.shape == (2, 4, 6)
    assert experts.grad_w1_memory.kept is None and experts.grad_w2_memory.kept is None


def test_rows_past_the_experts_rows_get_zero_output_and_zero_gradient():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(7, 6, generator=generator, requires_grad=True)  # 5 expert rows, 2 spare rows
    w = torch.randn(2, 6, 4, generator=generator, requires_grad=True)
    b = torch.randn(2, 4, generator=generator, requires_grad=True)
    y = grouped_linear(x, w, b, [2, 3])
    assert y[5:].eq(0).all()
    expected = reference_grouped_linear(x[:5].detach(), w.detach(), b.detach(), [2, 3])
    torch.testing.assert_close(y[:5].double(), expected, rtol=1e-6, atol=1e-6)
    y.backward(torch.ones_like(y))
    assert x.grad[5:].eq(0).all() and x.grad[:5].ne(0).all()
    torch.testing.assert_close(b.grad, torch.tensor([[2.0] * 4, [3.0] * 4]))  # spare rows add nothing


def test_grouped_buffers_take_one_of_a_few_sizes():
    sizes = [size_class(n) for n in range(0, 5000)]
    assert all(size >= n for n, size in enumerate(sizes)) and sizes == sorted(sizes)
    assert all(size <= n * 1.125 for n, size in enumerate(sizes) if n >= 64)
    assert len({size_class(n) for n in range(1025, 2049)}) == 8  # 8 sizes per doubling
    assert size_class(2048) == 2048 and size_class(2049) == 2304


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the grouped kernel's oneDNN products (each still computed); oneDNN for any size."""
    monkeypatch.setattr(experts_module, "ONEDNN_MIN_WEIGHT_ELEMENTS", 0)
    calls = []
    real = experts_module._onednn_linear_on_rows

    def counted(x_AI, rows, w_OI, b_O):
        calls.append(rows.stop - rows.start)
        return real(x_AI, rows, w_OI, b_O)

    monkeypatch.setattr(experts_module, "_onednn_linear_on_rows", counted)
    return calls


def test_onednn_linear_is_available_where_torch_has_onednn():
    # The torch wheels this project installs have oneDNN on x86; where they do, the probe must
    # find the operator working, or the grouped kernel silently loses its faster GEMMs.
    assert onednn_linear_available() == torch.backends.mkldnn.is_available()


@pytest.mark.skipif(not onednn_linear_available(), reason="this torch has no oneDNN linear")
def test_grouped_linear_on_onednn_matches_mkl_and_a_float64_reference(onednn_calls):
    # Row counts that are not multiples of 16, an empty expert, and the last expert's rounded-up
    # rows running past the buffer (2 spare rows only): the extra rows must change nothing.
    tokens_per_expert = [17, 0, 3, 30]
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(52, 24, generator=generator)
    w, b = torch.randn(4, 24, 40, generator=generator), torch.randn(4, 40, generator=generator)
    upstream = torch.randn(52, 40, generator=generator)
    results = {}
    for onednn in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = grouped_linear(*leaves, tokens_per_expert, onednn=onednn)
        (y * upstream).sum().backward()
        results[onednn] = [y.detach()] + [leaf.grad for leaf in leaves]
    assert onednn_calls == [17, 3, 30, 17, 3, 30]  # forward, then the input gradient; MKL run: none

    leaves = [t.double().requires_grad_() for t in (x[:50], w, b)]
    y_ref = reference_grouped_linear(*leaves, tokens_per_expert)
    (y_ref * upstream[:50].double()).sum().backward()
    for name, got, mkl, ref in zip("yxwb", results[True], results[False], [y_ref] + [t.grad for t in leaves]):
        torch.testing.assert_close(got, mkl, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(got[:50].double() if name in "yx" else got.double(), ref.detach(),
                                   rtol=1e-5, atol=1e-5, msg=name)
    assert results[True][0][50:].eq(0).all() and results[True][1][50:].eq(0).all()


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "mkl"])
def test_a_gated_grouped_linear_matches_a_float64_reference_in_outputs_and_gradients(onednn, onednn_calls):
    # y = gate * (x @ w[e] + b[e]); the last 3 rows are spare, with gate 0 as the layer pads them.
    tokens_per_expert = [5, 0, 18]
    generator = torch.Generator().manual_seed(6)
    x, gate = torch.randn(26, 8, generator=generator), torch.rand(26, generator=generator)
    gate[23:] = 0
    w, b = torch.randn(3, 8, 10, generator=generator), torch.randn(3, 10, generator=generator)
    upstream = torch.randn(26, 10, generator=generator)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, gate)]
    y = grouped_linear(*leaves[:3], tokens_per_expert, onednn=onednn, gate_A=leaves[3])
    (y * upstream).sum().backward()
    assert len(onednn_calls) == (4 if onednn and onednn_linear_available() else 0)

    refs = [t.double().requires_grad_() for t in (x[:23], w, b, gate[:23])]
    y_ref = refs[3].unsqueeze(1) * reference_grouped_linear(*refs[:3], tokens_per_expert)
    (y_ref * upstream[:23].double()).sum().backward()
    torch.testing.assert_close(y[:23].double(), y_ref, rtol=1e-5, atol=1e-5)
    assert y[23:].eq(0).all() and leaves[0].grad[23:].eq(0).all() and leaves[3].grad[23:].eq(0).all()
    for name, leaf, ref in zip(["x", "w", "b", "gate"], leaves, refs):
        got = leaf.grad[:23] if name in ("x", "gate") else leaf.grad
        torch.testing.assert_close(got.double(), ref.grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.skipif(not onednn_linear_available(), reason="this torch has no oneDNN linear")
def test_onednn_runs_only_for_float32_on_cpu_and_when_switched_on(onednn_calls):
    experts = StackedExperts(2, 8, 12)
    x_RD = torch.randn(5, 8, requires_grad=True)
    assert experts.grouped_uses_onednn(x_RD) and not experts.grouped_uses_onednn(x_RD.double())
    experts.grouped(x_RD, [2, 3]).sum().backward()
    assert len(onednn_calls) == 8  # 2 linears x 2 experts x (forward, input gradient)

    del onednn_calls[:]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        experts.grouped(x_RD, [2, 3]).float().sum().backward()
    experts.double().grouped(x_RD.double(), [2, 3]).sum().backward()
    experts.float().onednn_gemm = False
    assert not experts.grouped_uses_onednn(x_RD)
    experts.grouped(x_RD, [2, 3]).sum().backward()
    assert onednn_calls == []


def test_small_expert_weights_stay_on_mkl(monkeypatch, onednn_calls):
    monkeypatch.setattr(experts_module, "ONEDNN_MIN_WEIGHT_ELEMENTS", 8 * 12)
    assert StackedExperts(2, 8, 12).grouped_uses_onednn(torch.randn(5, 8)) is onednn_linear_available()
    small = StackedExperts(2, 8, 11)  # 88-element weights
    assert not small.grouped_uses_onednn(torch.randn(5, 8))
    small.grouped(torch.randn(5, 8, requires_grad=True), [2, 3]).sum().backward()
    assert onednn_calls == []


def test_without_a_working_onednn_the_grouped_kernel_uses_mkl(monkeypatch, onednn_calls):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    experts_module._onednn_probe.cache_clear()
    try:
        assert not onednn_linear_available()
        y = grouped_linear(torch.randn(5, 6), torch.randn(2, 6, 4), torch.randn(2, 4), [2, 3])
        assert y.shape == (5, 4) and onednn_calls == []
    finally:
        experts_module._onednn_probe.cache_clear()  # the next caller probes the real torch again
