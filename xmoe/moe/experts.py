"""Stacked expert FFNs: every local expert's weights in one tensor, computed with batched matmul.

Shape legend: E = local experts, C = token slots per expert (capacity), D = model dim,
F = FFN hidden dim.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

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
        hidden_ECF = self.activation(torch.baddbmm(self.b1_EF.unsqueeze(1), x_ECD, self.w1_EDF))
        return torch.baddbmm(self.b2_ED.unsqueeze(1), hidden_ECF, self.w2_EFD)  # (E, C, D)
