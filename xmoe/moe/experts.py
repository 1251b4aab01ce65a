"""Stacked expert FFNs: every local expert's weights in one tensor.

Two ways to run them: `forward` on a capacity-padded (E, C, D) buffer with batched matmul (what
expert parallelism's fixed-size all-to-all needs), and `grouped` on the tokens each expert
really has, one contiguous slice of an (A, D) buffer per expert (no padding rows computed).
Both write the weight gradients into memory reused from step to step on CPU
(ReusedGradientMemory). On CPU in float32 the grouped kernel's forward and input-gradient GEMMs
go through oneDNN where this torch has it (onednn_linear_available).

Shape legend: E = local experts, C = token slots per expert (capacity), A = assignments grouped
by expert, R = A plus spare rows (see size_class), D = model dim, F = FFN hidden dim, I / O = a linear
map's input / output dim.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def mark_expert_params(module: nn.Module) -> None:
    """Tag parameters that live on one expert-parallel rank only.

    fairseq's legacy_ddp skips the all-reduce of parameters with `.expert = True` (their
    gradients already hold every rank's tokens after the all-to-all) and its clip_grad_norm_
    accounts for them separately.
    """
    for param in module.parameters():
        param.expert = True


class ReusedGradientMemory:
    """Memory for one stacked expert weight's gradient, handed back to autograd every step (CPU).

    NOTE: fairseq (like most training loops) frees the gradients after each update, so every
    backward pass would write the experts' weight gradients, E times the dense FFN's, into fresh
    memory. On CPU, blocks that large come straight from the kernel and each 4 KB page faults
    when first written: at the benchmark shape that made the weight-gradient GEMMs about 40%
    slower than on memory already touched (docs/performance.md). Autograd makes a returned gradient the
    parameter's .grad without copying it when nothing else references it, so a new view of the
    memory kept here becomes .grad, and once the loop drops .grad the next backward writes into
    the same, already mapped, pages. The memory is reused only when no tensor outside this
    object still shares it (the previous .grad is gone); otherwise (gradient accumulation, a
    caller keeping an old gradient) the gradient goes to fresh memory as before, which then
    becomes the kept one. The price: the memory stays allocated between steps, as gradients do
    when a loop zeroes them instead of freeing them. On CUDA the caching allocator already hands
    back mapped memory, so there gradients are allocated as usual.
    """

    def __init__(self):
        self.kept: torch.Tensor | None = None

    def __getstate__(self):
        return {"kept": None}  # a copied or pickled module starts without the scratch memory

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor shaped like `like` that nothing else reads or writes."""
        kept = self.kept
        if (
            kept is None
            or kept.shape != like.shape
            or kept.dtype != like.dtype
            or kept.device != like.device
            or _storage_users(kept) > 1
        ):
            kept = self.kept = torch.empty_like(like, memory_format=torch.contiguous_format)
        return kept.view_as(kept)  # a new view: autograd may keep it as .grad; self.kept stays ours


def _storage_users(tensor: torch.Tensor) -> int:
    """Tensors (views included) sharing tensor's memory, tensor itself included."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # a torch without the counter: never reuse
        return 2
    # The temporary storage object made by untyped_storage() holds one reference of its own.
    return use_count(tensor.untyped_storage()._cdata) - 1


class _GroupedLinear(torch.autograd.Function):
    """y_AO = gate_A * (x_AI @ w_EIO[e] + b_EO[e]) on each expert e's contiguous rows of x_AI
    (gate_A None: no gate).

    NOTE: one GEMM per expert on its rows, written in place into slices of one output (forward)
    or one gradient tensor (backward): no zero-filled buffer, and no cat/stack copies as
    autograd through split/unbind would make. Experts with no rows get zero weight and bias
    gradients, as the padded batched matmul gives them. Rows past sum(tokens_per_expert) belong
    to no expert (see StackedExperts.grouped): their output and input gradient are zero.
    The gate (the MoE layer's gate values) is applied expert by expert while its rows are still
    in cache: as a separate multiply over the whole (A, O) output, with its two backward passes,
    the MoE layer's step took 1-3% longer at the benchmark shape (docs/performance.md).
    """

    @staticmethod
    def forward(ctx, x_AI, w_EIO, b_EO, tokens_per_expert, grad_w_memory, onednn, gate_A):
        ctx.tokens_per_expert = tokens_per_expert
        ctx.grad_w_memory = grad_w_memory
        ctx.onednn = onednn = onednn and _onednn_applies(x_AI, w_EIO)
        ctx.num_kept = num_kept = sum(tokens_per_expert)
        y_AO = x_AI.new_empty(x_AI.shape[0], w_EIO.shape[2])
        y_AO[num_kept:].zero_()
        # Without a gate the product is the output; with one, the ungated product is kept for
        # the gate's gradient, as autograd would keep it for a separate multiply.
        product_AO = y_AO if gate_A is None else torch.empty_like(y_AO)
        gate_A1 = None if gate_A is None else gate_A.to(y_AO.dtype).unsqueeze(1)
        for e, rows in enumerate(_expert_rows(tokens_per_expert)):
            if rows.stop == rows.start:
                continue
            if onednn:
                product_AO[rows].copy_(_onednn_linear_on_rows(x_AI, rows, w_EIO[e].t(), b_EO[e]))
            else:
                torch.addmm(b_EO[e], x_AI[rows], w_EIO[e], out=product_AO[rows])
            if gate_A1 is not None:
                torch.mul(product_AO[rows], gate_A1[rows], out=y_AO[rows])
        ctx.save_for_backward(x_AI, w_EIO, None if gate_A is None else product_AO, gate_A1)
        ctx.gate_dtype = None if gate_A is None else gate_A.dtype
        return y_AO

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y_AO):
        x_AI, w_EIO, product_AO, gate_A1 = ctx.saved_tensors
        grad_y_AO = grad_y_AO.contiguous()
        need_x, need_w, need_b, _, _, _, need_gate = ctx.needs_input_grad
        grad_x = x_AI.new_empty(x_AI.shape) if need_x else None
        if need_x:
            grad_x[ctx.num_kept :].zero_()
        grad_w = _new_weight_grad(w_EIO, ctx.grad_w_memory) if need_w else None
        grad_b = w_EIO.new_empty(w_EIO.shape[0], w_EIO.shape[2]) if need_b else None
        grad_gate = grad_y_AO.new_zeros(grad_y_AO.shape[0]) if need_gate else None
        for e, rows in enumerate(_expert_rows(ctx.tokens_per_expert)):
            if rows.stop == rows.start:
                for grad in (grad_w, grad_b):
                    if grad is not None:
                        grad[e].zero_()
                continue
            # grad_product holds the gradient with respect to x @ w + b in its rows `own`.
            if gate_A1 is None:
                grad_product, own = grad_y_AO, rows
            else:
                if need_gate:
                    torch.linalg.vecdot(grad_y_AO[rows], product_AO[rows], out=grad_gate[rows])
                # Gated over the rows the oneDNN product will read (see _onednn_linear_on_rows).
                wide = _onednn_rows(rows, grad_y_AO.shape[0]) if ctx.onednn else rows
                grad_product = grad_y_AO[wide] * gate_A1[wide]
                own = slice(0, rows.stop - rows.start)
            grad_y = grad_product[own]
            if need_x and ctx.onednn:
                grad_x[rows].copy_(_onednn_linear_on_rows(grad_product, own, w_EIO[e], None))
            elif need_x:
                torch.mm(grad_y, w_EIO[e].t(), out=grad_x[rows])
            if need_w:
                # NOTE: MKL here: oneDNN measured no faster on this GEMM, and its result would
                # need a copy into the reused gradient memory.
                torch.mm(x_AI[rows].t(), grad_y, out=grad_w[e])
            if need_b:
                torch.sum(grad_y, 0, out=grad_b[e])
        if grad_gate is not None:
            grad_gate = grad_gate.to(ctx.gate_dtype)
        return grad_x, grad_w, grad_b, None, None, None, grad_gate


def onednn_linear_available() -> bool:
    """Whether this torch runs oneDNN's float32 linear on CPU (torch.ops.mkldnn._linear_pointwise).

    NOTE: torch's float32 matmul on CPU calls MKL's sgemm. On the AMD EPYC CPUs this project is
    measured on, oneDNN's matmul computed the grouped kernel's forward and input-gradient GEMMs
    10-20% faster, its copy into the output buffer included, and a dense FFN's GEMMs too
    (docs/performance.md). The operator is internal to torch (it serves torch.compile's CPU
    backend), so it is probed once on a small product, and anything unexpected (a torch without
    it, a build without oneDNN, a wrong answer) keeps MKL.
    """
    return _onednn_probe()


@functools.lru_cache(maxsize=None)
def _onednn_probe() -> bool:
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():
            return False
        x_MI = torch.arange(6.0).view(2, 3)
        w_IO = torch.arange(12.0).view(3, 4) / 7
        got = op(x_MI, w_IO.t(), torch.ones(4), "none", [], "")
        return torch.allclose(got, x_MI @ w_IO + 1, rtol=1e-5, atol=1e-5)
    except Exception:  # noqa: BLE001 - a missing or broken private operator: use MKL
        return False


# Per-expert weights smaller than this (in elements) stay on MKL. NOTE: at d 128 and FFN 512 (the
# main job's model) oneDNN was no faster than MKL (layer benchmark: 1.006x), while every GEMM
# shape it sees costs memory for its cached primitive; from 256 x 1024 on it was 10-20% faster.
ONEDNN_MIN_WEIGHT_ELEMENTS = 256 * 1024


def _onednn_applies(x: torch.Tensor, w_EIO: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == w_EIO.dtype == torch.float32
        and w_EIO.shape[1] * w_EIO.shape[2] >= ONEDNN_MIN_WEIGHT_ELEMENTS
        and onednn_linear_available()
    )


ONEDNN_ROW_MULTIPLE = 16


def _onednn_linear_on_rows(x_AI: torch.Tensor, rows: slice, w_OI: torch.Tensor, b_O: torch.Tensor | None):
    """x_AI[rows] @ w_OI.T + b_O with oneDNN's matmul (float32, CPU); w_OI may be a transposed view.

    NOTE: oneDNN builds and caches one primitive per GEMM shape, and each expert's row count
    changes from batch to batch. With one shape per count, the cached primitives and the
    allocator's leftovers of their differently sized results took the resident set of
    bench_train's xmoe model from 930-970 MB to 1370-1420 MB (docs/performance.md). So the
    product runs on the rows rounded up to a multiple of ONEDNN_ROW_MULTIPLE (the following rows
    of x_AI, another expert's or spare ones, up to the end of the buffer). Each output row
    depends on its own input row only, and the extra ones are dropped: a few shapes come back,
    for at most 15 more rows per expert.
    """
    wide = _onednn_rows(rows, x_AI.shape[0])
    return torch.ops.mkldnn._linear_pointwise(x_AI[wide], w_OI, b_O, "none", [], "")[: rows.stop - rows.start]


def _onednn_rows(rows: slice, num_rows: int) -> slice:
    """rows with its length rounded up to a multiple of ONEDNN_ROW_MULTIPLE, within num_rows."""
    count = rows.stop - rows.start
    return slice(rows.start, min(rows.start + -(-count // ONEDNN_ROW_MULTIPLE) * ONEDNN_ROW_MULTIPLE, num_rows))


class _BatchedLinear(torch.autograd.Function):
    """y_ECO = x_ECI @ w_EIO + b_EO[:, None]: torch.baddbmm, with its weight gradient written to
    reused memory (see ReusedGradientMemory)."""

    @staticmethod
    def forward(ctx, x_ECI, w_EIO, b_EO, grad_w_memory):
        ctx.save_for_backward(x_ECI, w_EIO)
        ctx.grad_w_memory = grad_w_memory
        return torch.baddbmm(b_EO.unsqueeze(1), x_ECI, w_EIO)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y_ECO):
        x_ECI, w_EIO = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        grad_x = torch.bmm(grad_y_ECO, w_EIO.transpose(1, 2)) if need_x else None
        grad_w = None
        if need_w:
            grad_w = torch.bmm(x_ECI.transpose(1, 2), grad_y_ECO, out=_new_weight_grad(w_EIO, ctx.grad_w_memory))
        grad_b = grad_y_ECO.sum(1) if need_b else None
        return grad_x, grad_w, grad_b, None


def _new_weight_grad(w_EIO: torch.Tensor, memory: ReusedGradientMemory | None) -> torch.Tensor:
    if memory is None or w_EIO.device.type != "cpu":
        return w_EIO.new_empty(w_EIO.shape)
    return memory.take(w_EIO)


def _expert_rows(tokens_per_expert: list[int]) -> list[slice]:
    """Each expert's slice of the rows of a buffer grouped by expert."""
    rows, start = [], 0
    for count in tokens_per_expert:
        rows.append(slice(start, start + count))
        start += count
    return rows


def grouped_linear(
    x_AI: torch.Tensor,
    w_EIO: torch.Tensor,
    b_EO: torch.Tensor,
    tokens_per_expert: list[int],
    grad_w_memory: ReusedGradientMemory | None = None,
    onednn: bool = True,
    gate_A: torch.Tensor | None = None,
):
    """Per-expert linear map of rows grouped by expert (see _GroupedLinear), autocast-aware.

    onednn: let float32 CPU GEMMs use oneDNN where available (see onednn_linear_available).
    gate_A: optional (A,) weights each output row is multiplied by (differentiable).
    """
    return _without_autocast(
        _GroupedLinear.apply, x_AI, w_EIO, b_EO, tokens_per_expert, grad_w_memory, onednn, gate_A
    )


def batched_linear(
    x_ECI: torch.Tensor, w_EIO: torch.Tensor, b_EO: torch.Tensor, grad_w_memory: ReusedGradientMemory | None = None
):
    """Per-expert linear map of a capacity-padded (E, C, I) buffer (see _BatchedLinear), autocast-aware."""
    return _without_autocast(_BatchedLinear.apply, x_ECI, w_EIO, b_EO, grad_w_memory)


def _without_autocast(linear_function, x, w, b, *rest):
    device_type = x.device.type
    try:
        autocast_on = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know, such as meta
        return linear_function(x, w, b, *rest)
    if autocast_on:
        # What autocast does for a matmul: compute in its dtype; autograd casts the gradients back.
        dtype = torch.get_autocast_dtype(device_type)
        x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return linear_function(x, w, b, *rest)


class StackedExperts(nn.Module):
    """E independent FFNs D -> F -> D: w1 (E, D, F), w2 (E, F, D), biases (E, F), (E, D).

    Expert e computes act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]; with E = 1 this is exactly
    nn.Linear(D, F) -> act -> nn.Linear(F, D) with weights w1[0].T and w2[0].T.
    """

    def __init__(self, num_experts: int, d_model: int, d_ffn: int, activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ffn))
        self.b1_EF = nn.Parameter(torch.empty(num_experts, d_ffn))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, d_ffn, d_model))
        self.b2_ED = nn.Parameter(torch.empty(num_experts, d_model))
        self.reset_parameters()
        mark_expert_params(self)
        # Not module state: plain attributes, outside state_dict and parameters(). Set both to
        # None to give the weight-gradient memory back between steps (slower on CPU).
        self.grad_w1_memory, self.grad_w2_memory = ReusedGradientMemory(), ReusedGradientMemory()
        # False: the grouped kernel's float32 CPU GEMMs all use torch's default (MKL) instead of
        # oneDNN (see onednn_linear_available).
        self.onednn_gemm = True

    @property
    def num_experts(self) -> int:
        return self.w1_EDF.shape[0]

    def reset_parameters(self) -> None:
        # Same distribution as nn.Linear's default init, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        d_model, d_ffn = self.w1_EDF.shape[1], self.w1_EDF.shape[2]
        for param, fan_in in ((self.w1_EDF, d_model), (self.b1_EF, d_model), (self.w2_EFD, d_ffn), (self.b2_ED, d_ffn)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(param, -bound, bound)

    def forward(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Capacity-padded input: expert e runs on all C rows of x_ECD[e], empty slots included."""
        hidden_ECF = self.activation(batched_linear(x_ECD, self.w1_EDF, self.b1_EF, self.grad_w1_memory))
        return batched_linear(hidden_ECF, self.w2_EFD, self.b2_ED, self.grad_w2_memory)  # (E, C, D)

    def grouped_uses_onednn(self, x_RD: torch.Tensor) -> bool:
        """Whether grouped() on x_RD runs its forward and input-gradient GEMMs on oneDNN."""
        return self.onednn_gemm and _onednn_applies(x_RD, self.w1_EDF) and _onednn_applies(x_RD, self.w2_EFD)

    def grouped(
        self, x_RD: torch.Tensor, tokens_per_expert: list[int], gate_R: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows grouped by expert: expert e runs on its tokens_per_expert[e] contiguous rows only.

        Rows past sum(tokens_per_expert) are spare: no expert computes them and their output
        (and gradient) is zero, whatever they hold (see size_class for why a caller pads).
        gate_R: optional (R,) weights each output row is multiplied by, inside the kernel
        (the MoE layer's gate values; see _GroupedLinear).
        """
        hidden_RF = grouped_linear(
            x_RD, self.w1_EDF, self.b1_EF, tokens_per_expert, self.grad_w1_memory, self.onednn_gemm
        )
        hidden_RF = self.activation(hidden_RF)
        return grouped_linear(  # (R, D)
            hidden_RF, self.w2_EFD, self.b2_ED, tokens_per_expert, self.grad_w2_memory, self.onednn_gemm, gate_R
        )


def size_class(num_rows: int) -> int:
    """num_rows rounded up to a multiple of 1/8 of the power of two below it (at least 8 rows).

    NOTE: the number of kept assignments A changes from batch to batch, and so would the size of
    every buffer of the grouped kernel. On CPU, glibc then keeps the freed pieces, and the
    resident set grew by several MB per training step without bound (docs/performance.md).
    Padding A with spare rows up to one of a few sizes R (at most 1/8 more rows from 64 rows on)
    makes the same sizes come back, so their memory is reused; the GEMMs skip the spare rows.
    """
    step = max(8, 1 << max(num_rows.bit_length() - 4, 0))
    return -(-num_rows // step) * step
