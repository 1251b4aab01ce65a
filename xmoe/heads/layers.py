"""The task heads' building blocks, torch only: shared by xmoe.heads (plain torch wrappers,
xmoe-finetune) and the transformers classes of an export (xmoe/hf/modeling_xmoe.py, which
xmoe-export copies along with this file).

Shape legend: B = batch size, T = sequence length, C = model dim, N = num_labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xmoe.encoder import XMoEEncoder
from xmoe.moe import MoEAux
from xmoe.moe import freeze_moe as freeze_moe_layers

POOLINGS = ("first", "mean")
IGNORE_INDEX = -100  # token labels that take no part in the loss (padding, continuation pieces)

FREEZE_MOE_CHOICES = ("none", "router", "router_and_experts")


def freeze_moe_parts(encoder: XMoEEncoder, freeze_moe: str) -> list[nn.Parameter]:
    """Freeze what `freeze_moe` names in every MoE layer: "none", "router" (projection, expert
    embeddings, temperature) or "router_and_experts"; returns the parameters it froze."""
    if freeze_moe not in FREEZE_MOE_CHOICES:
        raise ValueError(f"freeze_moe must be one of {FREEZE_MOE_CHOICES}, got {freeze_moe!r}")
    return freeze_moe_layers(encoder, router=freeze_moe != "none", experts=freeze_moe == "router_and_experts")


def freeze_for_finetuning(encoder: XMoEEncoder, freeze_moe: str) -> list[nn.Parameter]:
    """Freeze the MoE parts that `freeze_moe` names ("none", "router", "router_and_experts": the
    paper's setting) and the MLM head's own layers; returns the frozen MoE parameters.

    The MLM head's dense, LayerNorm and output bias play no part in a task head (its projection
    is the token embedding matrix, which does train); freezing them keeps them out of the
    optimizer."""
    frozen = freeze_moe_parts(encoder, freeze_moe)
    lm_head = encoder.lm_head
    for param in [*lm_head.dense.parameters(), *lm_head.layer_norm.parameters(), lm_head.bias]:
        param.requires_grad_(False)
    return frozen


def mean_balance_loss(moe_aux: list[MoEAux], like: torch.Tensor) -> torch.Tensor:
    """The balance loss averaged over MoE layers; 0 (of `like`'s dtype/device) without any."""
    return torch.stack([aux.balance_loss for aux in moe_aux]).mean() if moe_aux else like.new_zeros(())


def with_balance_loss(task_loss: torch.Tensor, balance_loss: torch.Tensor, weight: float) -> torch.Tensor:
    """task_loss + weight x balance_loss (weight 0: task_loss alone)."""
    return task_loss + weight * balance_loss if weight else task_loss


class SequenceClassificationHead(nn.Module):
    """Pooled state -> dropout -> dense -> tanh -> dropout -> N logits (the RoBERTa/XLM-R
    classification head). pooling: the `<s>` state ("first") or the mean over real tokens."""

    def __init__(self, hidden_size: int, num_labels: int, pooling: str = "first", dropout: float = 0.1):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, num_labels)

    def forward(self, features_BTC: torch.Tensor, padding_mask_BT: torch.Tensor) -> torch.Tensor:
        if self.pooling == "first":
            pooled_BC = features_BTC[:, 0]
        else:
            keep_BT1 = (~padding_mask_BT).unsqueeze(-1).to(features_BTC.dtype)
            pooled_BC = (features_BTC * keep_BT1).sum(1) / keep_BT1.sum(1).clamp(min=1)
        hidden_BC = torch.tanh(self.dense(self.dropout(pooled_BC)))
        return self.out_proj(self.dropout(hidden_BC))  # (B, N)


class TokenClassificationHead(nn.Module):
    """Dropout -> N logits per position (POS, NER)."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden_size, num_labels)

    def forward(self, features_BTC: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(features_BTC))  # (B, T, N)


def token_classification_loss(logits_BTN: torch.Tensor, labels_BT: torch.Tensor, padding_mask_BT: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over labelled positions: IGNORE_INDEX labels and padding take no part."""
    labels_BT = labels_BT.masked_fill(padding_mask_BT, IGNORE_INDEX)
    return F.cross_entropy(logits_BTN.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=IGNORE_INDEX)
