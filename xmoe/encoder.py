"""The X-MoE encoder in plain torch: an XLM-R-style Transformer encoder whose FFN is an
`xmoe.moe.MoELayer` in chosen layers. No fairseq here: the fairseq model (xmoe/models), the
exported Hugging Face model and `xmoe.hub` all run this same module.

Shape legend: B = batch size, T = sequence length, C = model dim (encoder_embed_dim),
F = FFN hidden dim, H = attention heads, V = vocabulary size, M = masked tokens.

    tokens (B, T) -> token emb [+ learned positions + language emb] -> LN -> dropout
      -> L x [self-attention -> FFN (dense, or MoELayer in MoE layers)]
      -> features (B, T, C) -> MLM head tied to the token embeddings -> logits (B, T, V)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from xmoe.moe import ACTIVATIONS, MoEAux, MoELayer


@dataclass
class EncoderConfig:
    """Everything that defines the network (JSON-serializable: it is the exported config.json)."""

    vocab_size: int
    padding_idx: int
    encoder_layers: int = 4
    encoder_embed_dim: int = 64
    encoder_ffn_embed_dim: int = 128
    encoder_attention_heads: int = 4
    moe_layer_indices: list[int] = field(default_factory=list)  # 0-based layers with an MoE FFN
    moe_experts: int = 0
    max_positions: int = 512
    num_languages: int = 0
    scale_embedding: bool = False
    no_layernorm_embedding: bool = False
    encoder_normalize_before: bool = False
    activation_fn: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    moe_gate: str = "xmoe"
    moe_top_k: int = 1
    moe_routing_dim: int = 16
    moe_gate_fn: str = "softmax"
    moe_normalize: bool = True
    moe_capacity_factor: float = 1.0
    moe_eval_capacity_factor: Optional[float] = None
    moe_balance_temperature: Optional[float] = None
    moe_z_loss_weight: float = 0.0
    moe_second_expert_policy: str = "all"
    moe_batch_prioritized: bool = False
    moe_renormalize_gates: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EncoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown encoder config keys {unknown}; known: {sorted(known)}")
        return cls(**values)


def build_moe_layer(cfg: EncoderConfig, process_group=None, expert_data_parallel_group=None) -> MoELayer:
    return MoELayer(
        d_model=cfg.encoder_embed_dim,
        d_ffn=cfg.encoder_ffn_embed_dim,
        num_experts=cfg.moe_experts,
        gate=cfg.moe_gate,
        top_k=cfg.moe_top_k,
        routing_dim=cfg.moe_routing_dim or None,
        gate_fn=cfg.moe_gate_fn,
        capacity_factor=cfg.moe_capacity_factor,
        eval_capacity_factor=cfg.moe_eval_capacity_factor,
        balance_temperature=cfg.moe_balance_temperature,
        z_loss_weight=cfg.moe_z_loss_weight,
        activation=cfg.activation_fn,
        process_group=process_group,
        expert_data_parallel_group=expert_data_parallel_group,
        normalize=cfg.moe_normalize,
        second_expert_policy=cfg.moe_second_expert_policy,
        batch_prioritized=cfg.moe_batch_prioritized,
        renormalize_gates=cfg.moe_renormalize_gates,
    )


class SelfAttention(nn.Module):
    """Multi-head self-attention over a padded batch (fused QKV, scaled_dot_product_attention)."""

    def __init__(self, dim: int, num_heads: int, attention_dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"encoder_embed_dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.qkv_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x_BTC: torch.Tensor, key_padding_mask_BT: Optional[torch.Tensor]) -> torch.Tensor:
        B, T, C = x_BTC.shape
        q, k, v = self.qkv_proj(x_BTC).split(C, dim=-1)
        # (B, T, C) -> (B, H, T, C/H)
        q, k, v = (t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2) for t in (q, k, v))
        attn_mask = None
        if key_padding_mask_BT is not None:
            attn_mask = ~key_padding_mask_BT[:, None, None, :]  # (B, 1, 1, T), True = may attend
        dropout_p = self.attention_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class DenseFFN(nn.Module):
    """C -> F -> C feed-forward block of a dense layer."""

    def __init__(self, dim: int, ffn_dim: int, activation: str, activation_dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.activation = ACTIVATIONS[activation]
        self.activation_dropout = nn.Dropout(activation_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_dropout(self.activation(self.fc1(x))))


class EncoderLayer(nn.Module):
    """Self-attention + FFN, each with residual and LayerNorm (post-LN, or pre-LN)."""

    def __init__(self, cfg: EncoderConfig, moe: Optional[MoELayer]):
        super().__init__()
        C = cfg.encoder_embed_dim
        self.normalize_before = cfg.encoder_normalize_before
        self.self_attn = SelfAttention(C, cfg.encoder_attention_heads, cfg.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(C)
        self.ffn = moe if moe is not None else DenseFFN(
            C, cfg.encoder_ffn_embed_dim, cfg.activation_fn, cfg.activation_dropout
        )
        self.final_layer_norm = nn.LayerNorm(C)
        self.dropout = nn.Dropout(cfg.dropout)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoELayer)

    def forward(
        self, x_BTC: torch.Tensor, padding_mask_BT: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[MoEAux]]:
        residual = x_BTC
        x = self.self_attn_layer_norm(x_BTC) if self.normalize_before else x_BTC
        x = residual + self.dropout(self.self_attn(x, padding_mask_BT))
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)

        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        aux = None
        if self.is_moe:
            x, aux = self.ffn(x, padding_mask=padding_mask_BT)
        else:
            x = self.ffn(x)
        x = residual + self.dropout(x)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return x, aux


class MaskedLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> projection tied to the token embeddings (+ bias)."""

    def __init__(self, dim: int, activation: str, embed_weight_VC: nn.Parameter):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.activation = ACTIVATIONS[activation]
        self.layer_norm = nn.LayerNorm(dim)
        self.weight = embed_weight_VC  # shared with the embeddings, not a copy
        self.bias = nn.Parameter(torch.zeros(embed_weight_VC.shape[0]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(self.activation(self.dense(features)))
        return F.linear(x, self.weight) + self.bias  # (..., V)


class XMoEEncoder(nn.Module):
    """XLM-R-style masked-LM encoder with sparse (X-MoE) FFNs in cfg.moe_layer_indices.

    process_group / expert_data_parallel_group: expert parallelism (see xmoe.moe.parallel);
    None keeps every expert in this process.
    """

    def __init__(self, cfg: EncoderConfig, process_group=None, expert_data_parallel_group=None):
        super().__init__()
        self.cfg = cfg
        self.padding_idx = cfg.padding_idx
        C = cfg.encoder_embed_dim
        bad = [i for i in cfg.moe_layer_indices if not 0 <= i < cfg.encoder_layers]
        if bad:
            raise ValueError(f"MoE layer indices {bad} outside 0..{cfg.encoder_layers - 1}")
        if cfg.moe_layer_indices and cfg.moe_experts < 1:
            raise ValueError("MoE layers need moe_experts >= 1")
        self.embed_tokens = nn.Embedding(cfg.vocab_size, C, padding_idx=cfg.padding_idx)
        self.embed_positions = nn.Embedding(cfg.max_positions, C)
        self.embed_languages = nn.Embedding(cfg.num_languages, C) if cfg.num_languages > 0 else None
        self.embed_scale = math.sqrt(C) if cfg.scale_embedding else 1.0
        self.layernorm_embedding = None if cfg.no_layernorm_embedding else nn.LayerNorm(C)
        self.dropout = nn.Dropout(cfg.dropout)

        self.moe_layer_indices = sorted(cfg.moe_layer_indices)
        self.layers = nn.ModuleList(
            EncoderLayer(
                cfg,
                build_moe_layer(cfg, process_group, expert_data_parallel_group)
                if i in self.moe_layer_indices
                else None,
            )
            for i in range(cfg.encoder_layers)
        )
        self.final_layer_norm = nn.LayerNorm(C) if cfg.encoder_normalize_before else None
        self.lm_head = MaskedLMHead(C, cfg.activation_fn, self.embed_tokens.weight)
        self._init_dense_weights()

    def moe_layers(self) -> list[MoELayer]:
        return [layer.ffn for layer in self.layers if layer.is_moe]

    def _init_dense_weights(self) -> None:
        # BERT/XLM-R init (normal std 0.02, zero biases, zero padding embedding) for everything
        # except the MoE layers, whose routers need their own init (e.g. orthogonal expert
        # embeddings, tau = 0.07) and whose experts are initialised by xmoe.moe.
        moe_modules = {id(m) for moe in self.moe_layers() for m in moe.modules()}
        for module in self.modules():
            if id(module) in moe_modules:
                continue
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
                if module.padding_idx is not None:
                    nn.init.zeros_(module.weight[module.padding_idx])

    def embed(
        self,
        src_tokens: torch.Tensor,
        padding_mask_BT: torch.Tensor,
        src_langs: Optional[torch.Tensor],
        src_positions: Optional[torch.Tensor],
    ) -> torch.Tensor:
        if src_positions is None:
            # 0, 1, 2, ... over the real tokens of each row, wherever the padding sits.
            src_positions = ((~padding_mask_BT).long().cumsum(dim=1) - 1).clamp(min=0)
        x = self.embed_scale * self.embed_tokens(src_tokens) + self.embed_positions(src_positions)
        if self.embed_languages is not None and src_langs is not None:
            x = x + self.embed_languages(src_langs)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = self.dropout(x)
        # Padding carries nothing into attention keys or MoE routing.
        return x.masked_fill(padding_mask_BT.unsqueeze(-1), 0.0)  # (B, T, C)

    def forward(
        self,
        src_tokens: torch.Tensor,
        src_langs: Optional[torch.Tensor] = None,
        src_positions: Optional[torch.Tensor] = None,
        features_only: bool = False,
        return_all_hiddens: bool = False,
        masked_tokens: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Returns (logits (B, T, V), or (M, V) at masked_tokens; or features (B, T, C)), extra."""
        padding_mask_BT = src_tokens.eq(self.padding_idx)  # True = padding
        key_padding_mask = padding_mask_BT if padding_mask_BT.any() else None
        x = self.embed(src_tokens, padding_mask_BT, src_langs, src_positions)

        inner_states = [x.transpose(0, 1)] if return_all_hiddens else []  # each (T, B, C)
        moe_aux: list[MoEAux] = []
        for layer in self.layers:
            x, aux = layer(x, key_padding_mask)
            if aux is not None:
                moe_aux.append(aux)
            if return_all_hiddens:
                inner_states.append(x.transpose(0, 1))
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
            if return_all_hiddens:
                inner_states[-1] = x.transpose(0, 1)

        extra = {"moe_aux": moe_aux, "inner_states": inner_states, "padding_mask": padding_mask_BT}
        if features_only:
            return x, extra
        if masked_tokens is not None:
            x = x[masked_tokens]  # (M, C): project only the tokens the loss needs
        return self.lm_head(x), extra
