"""Stacked expert FFNs: every local expert's weights in one tensor.

Two ways to run them: `forward` on a capacity-padded (E, C, D) buffer with batched matmul (what
expert parallelism's fixed-size all-to-all needs), and `grouped` on the tokens each expert
really has, one contiguous slice of an (A, D) buffer per expert (no padding rows computed).

Shape legend: E = local experts, C = token slots per expert (capacity), A = assignments grouped
by expert, D = model dim, F = FFN hidden dim, I / O = a linear map's input / output dim.
"""

from __future__ import annotations

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


class _GroupedLinear(torch.autograd.Function):
    """y_AO = x_AI @ w_EIO[e] + b_EO[e] on each expert e's contiguous rows of x_AI.

    NOTE: one GEMM per expert on its rows, written in place into slices of one output (forward)
    or one gradient tensor (backward): no padding rows, no zero-filled buffer, and no
    cat/stack copies as autograd through split/unbind would make. Experts with no rows get
    zero weight and bias gradients, as the padded batched matmul gives them.
    """

    @staticmethod
    def forward(ctx, x_AI, w_EIO, b_EO, tokens_per_expert):
        ctx.save_for_backward(x_AI, w_EIO)
        ctx.tokens_per_expert = tokens_per_expert
        y_AO = x_AI.new_empty(x_AI.shape[0], w_EIO.shape[2])
        for e, rows in enumerate(_expert_rows(tokens_per_expert)):
            if rows.stop > rows.start:
                torch.addmm(b_EO[e], x_AI[rows], w_EIO[e], out=y_AO[rows])
        return y_AO

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y_AO):
        x_AI, w_EIO = ctx.saved_tensors
        grad_y_AO = grad_y_AO.contiguous()
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        grad_x = x_AI.new_empty(x_AI.shape) if need_x else None
        grad_w = w_EIO.new_empty(w_EIO.shape) if need_w else None
        grad_b = w_EIO.new_empty(w_EIO.shape[0], w_EIO.shape[2]) if need_b else None
        for e, rows in enumerate(_expert_rows(ctx.tokens_per_expert)):
            grad_y = grad_y_AO[rows]
            if rows.stop == rows.start:
                for grad in (grad_w, grad_b):
                    if grad is not None:
                        grad[e].zero_()
                continue
            if need_x:
                torch.mm(grad_y, w_EIO[e].t(), out=grad_x[rows])
            if need_w:
                torch.mm(x_AI[rows].t(), grad_y, out=grad_w[e])
            if need_b:
                torch.sum(grad_y, 0, out=grad_b[e])
        return grad_x, grad_w, grad_b, None


def _expert_rows(tokens_per_expert: list[int]) -> list[slice]:
    """Each expert's slice of the rows of a buffer grouped by expert."""
    rows, start = [], 0
    for count in tokens_per_expert:
        rows.append(slice(start, start + count))
        start += count
    return rows


def grouped_linear(x_AI: torch.Tensor, w_EIO: torch.Tensor, b_EO: torch.Tensor, tokens_per_expert: list[int]):
    """Per-expert linear map of rows grouped by expert (see _GroupedLinear), autocast-aware."""
    device_type = x_AI.device.type
    if torch.is_autocast_enabled(device_type):
        # What autocast does for a matmul: compute in its dtype; autograd casts the gradients back.
        dtype = torch.get_autocast_dtype(device_type)
        x_AI, w_EIO, b_EO = x_AI.to(dtype), w_EIO.to(dtype), b_EO.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return _GroupedLinear.apply(x_AI, w_EIO, b_EO, tokens_per_expert)


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
        hidden_ECF = self.activation(torch.baddbmm(self.b1_EF.unsqueeze(1), x_ECD, self.w1_EDF))
        return torch.baddbmm(self.b2_ED.unsqueeze(1), hidden_ECF, self.w2_EFD)  # (E, C, D)

    def grouped(self, x_AD: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """Rows grouped by expert: expert e runs on its tokens_per_expert[e] contiguous rows only."""
        hidden_AF = self.activation(grouped_linear(x_AD, self.w1_EDF, self.b1_EF, tokens_per_expert))
        return grouped_linear(hidden_AF, self.w2_EFD, self.b2_ED, tokens_per_expert)  # (A, D)
