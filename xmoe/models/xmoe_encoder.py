"""The X-MoE encoder: an XLM-R-style Transformer encoder whose FFN is sparse in chosen layers.

Shape legend: B = batch size, T = sequence length, C = model dim (encoder_embed_dim),
F = FFN hidden dim, H = attention heads, V = vocabulary size, M = masked tokens.

    tokens (B, T) -> token emb [+ learned positions + language emb] -> LN -> dropout
      -> L x [self-attention -> FFN (dense, or xmoe.moe.MoELayer in MoE layers)]
      -> features (B, T, C) -> MLM head tied to the token embeddings -> logits (B, T, V)

Inputs follow docs/CONTRACTS.md ("Model inputs"). The model also runs under fairseq's own
`masked_lm` task, whose net_input carries only src_tokens and src_lengths.

Architectures fill the size options (layers, dims, experts, where the MoE layers go) only where
the user left them unset, on the command line and in Hydra configs alike: those options default
to None, meaning "as the --arch says".
"""


import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model, register_model_architecture
from torch import nn

from xmoe.moe import GATE_FNS, GATES, SECOND_EXPERT_POLICIES, MoEAux, MoELayer, expert_parallel_groups

logger = logging.getLogger(__name__)

ACTIVATION_CHOICES = ChoiceEnum(["gelu", "gelu_tanh", "relu", "silu"])
DENSE_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass
class XMoEEncoderConfig(FairseqDataclass):
    # --- sizes: None = the value of the chosen --arch (see ARCHITECTURES below) ---
    encoder_layers: Optional[int] = field(
        default=None, metadata={"help": "number of Transformer layers; unset: the --arch value"}
    )
    encoder_embed_dim: Optional[int] = field(
        default=None, metadata={"help": "model (embedding) dimension C; unset: the --arch value"}
    )
    encoder_ffn_embed_dim: Optional[int] = field(
        default=None,
        metadata={"help": "hidden dimension F of each FFN, dense or expert; unset: the --arch value"},
    )
    encoder_attention_heads: Optional[int] = field(
        default=None, metadata={"help": "number of attention heads; unset: the --arch value"}
    )
    moe_experts: Optional[int] = field(
        default=None,
        metadata={"help": "number of experts per MoE layer; 0 = dense model; unset: the --arch value"},
    )
    moe_freq: Optional[int] = field(
        default=None,
        metadata={
            "help": "make every k-th layer an MoE layer: 0-based layers k-1, 2k-1, ... "
            "(k=2 on 4 layers: layers 1 and 3); 0 = none; ignored when --moe-layers is given; "
            "unset: the --arch value"
        },
    )
    moe_layers: Optional[str] = field(
        default=None,
        metadata={
            "help": "comma-separated 0-based indices of the MoE layers, e.g. '5' or '1,3,5'; "
            "takes precedence over --moe-freq, '' = use --moe-freq; unset: the --arch value"
        },
    )
    # --- encoder ---
    max_positions: int = field(
        default=512, metadata={"help": "number of learned positions (longest input, in tokens)"}
    )
    num_languages: int = field(
        default=0,
        metadata={
            "help": "size of the language-embedding table added to the token embeddings "
            "(language ids come as src_langs); 0 = no language embeddings"
        },
    )
    scale_embedding: bool = field(
        default=False,
        metadata={"help": "multiply token embeddings by sqrt(C) (XLM-R does not)"},
    )
    no_layernorm_embedding: bool = field(
        default=False, metadata={"help": "skip the LayerNorm applied to the summed embeddings"}
    )
    encoder_normalize_before: bool = field(
        default=False,
        metadata={
            "help": "pre-LN layers (LayerNorm before each sub-layer, plus a final LayerNorm) "
            "instead of XLM-R's post-LN"
        },
    )
    activation_fn: ACTIVATION_CHOICES = field(  # type: ignore[valid-type]
        default="gelu", metadata={"help": "activation of the dense FFNs, the experts and the MLM head"}
    )
    dropout: float = field(default=0.1, metadata={"help": "dropout on embeddings and sub-layer outputs"})
    attention_dropout: float = field(default=0.1, metadata={"help": "dropout on attention weights"})
    activation_dropout: float = field(
        default=0.0, metadata={"help": "dropout after the activation inside dense FFNs"}
    )
    # --- MoE layer (xmoe.moe.MoELayer) ---
    moe_gate: ChoiceEnum(GATES) = field(  # type: ignore[valid-type]
        default="xmoe",
        metadata={
            "help": "router: 'xmoe' (cosine on a low-dim hypersphere, learnable temperature), "
            "'xmoe_torchscale' (the authors' public variant), 'switch' / 'switch_sigmoid' "
            "(linear router, top-1), 'gshard' (linear router, top-2)"
        },
    )
    moe_top_k: int = field(default=1, metadata={"help": "experts per token (gshard needs 2)"})
    moe_routing_dim: int = field(
        default=16,
        metadata={
            "help": "X-MoE routing dimension d_e the token is projected to (the paper: number of "
            "experts / 2); 0 = no projection (routing in the full C dims)"
        },
    )
    moe_gate_fn: ChoiceEnum(GATE_FNS) = field(  # type: ignore[valid-type]
        default="softmax", metadata={"help": "gate activation: softmax over experts or sigmoid of the score"}
    )
    moe_no_normalize: bool = field(
        default=False,
        metadata={"help": "X-MoE without the L2 normalization of token and expert embeddings (ablation)"},
    )
    moe_capacity_factor: float = field(
        default=1.0,
        metadata={
            "help": "expert capacity in training = factor x tokens x top-k / experts; tokens "
            "over capacity skip the FFN (the residual carries them); <= 0 = dropless"
        },
    )
    moe_eval_capacity_factor: Optional[float] = field(
        default=None, metadata={"help": "capacity factor in evaluation; None = the training capacity factor"}
    )
    moe_balance_temperature: Optional[float] = field(
        default=None,
        metadata={
            "help": "fixed temperature tau0 of the balance loss's router probabilities; None = "
            "the paper's 0.3 (softmax) / 0.07 (sigmoid) for X-MoE gates, 1 for linear routers"
        },
    )
    moe_z_loss_weight: float = field(
        default=0.0, metadata={"help": "weight of the router z-loss (mean squared logsumexp of the logits)"}
    )
    moe_second_expert_policy: ChoiceEnum(SECOND_EXPERT_POLICIES) = field(  # type: ignore[valid-type]
        default="all",
        metadata={
            "help": "top-2 only: 'all' always keeps the second expert, 'sampling' draws it with "
            "Gumbel noise, 'random' keeps it with probability 2 x its gate value"
        },
    )
    moe_batch_prioritized: bool = field(
        default=False,
        metadata={"help": "fill expert capacity by descending gate value instead of token order"},
    )
    moe_expert_parallel: bool = field(
        default=False,
        metadata={
            "help": "shard experts over the distributed workers (all-to-all dispatch); needs "
            "experts divisible by the world size or vice versa"
        },
    )


# Size presets. Each value is used only where the option was left unset (None).
_SIZES = {
    #          layers, C,    F,    heads
    "tiny": (4, 64, 128, 4),
    "small": (6, 512, 2048, 8),
    "base": (12, 768, 3072, 12),
    "large": (24, 1024, 4096, 16),
}
ARCHITECTURES: dict[str, dict[str, Any]] = {}
for _size, (_layers, _dim, _ffn, _heads) in _SIZES.items():
    _shape = dict(
        encoder_layers=_layers, encoder_embed_dim=_dim, encoder_ffn_embed_dim=_ffn, encoder_attention_heads=_heads
    )
    ARCHITECTURES[f"xmoe_{_size}"] = dict(
        _shape, moe_experts=4 if _size == "tiny" else 32, moe_freq=2, moe_layers=""
    )
    ARCHITECTURES[f"dense_{_size}"] = dict(_shape, moe_experts=0, moe_freq=0, moe_layers="")
# The paper's NeurIPS setup: one sparse layer of 32 experts "after layer 6" of 12. We read that
# as the FFN of the 6th layer (0-based index 5): the sparse FFN closes layer 6, and layer 7 sees
# its output. --moe-layers 6 gives the other reading.
ARCHITECTURES["xmoe_base_paper"] = dict(ARCHITECTURES["xmoe_base"], moe_freq=0, moe_layers="5")


def apply_architecture(cfg: Any, arch: str) -> None:
    """Fill the size options of `cfg` (Namespace or DictConfig) left unset with `arch`'s values."""
    for name, value in ARCHITECTURES[arch].items():
        if getattr(cfg, name, None) is None:
            setattr(cfg, name, value)


def moe_layer_indices(cfg: XMoEEncoderConfig) -> list[int]:
    """0-based indices of the layers whose FFN is an MoELayer (empty for a dense model)."""
    if not cfg.moe_experts:
        return []
    if cfg.moe_layers:
        indices = sorted({int(i) for i in str(cfg.moe_layers).split(",") if i.strip()})
        bad = [i for i in indices if not 0 <= i < cfg.encoder_layers]
        if bad:
            raise ValueError(f"--moe-layers {bad} outside 0..{cfg.encoder_layers - 1}")
        return indices
    if cfg.moe_freq and cfg.moe_freq > 0:
        return list(range(cfg.moe_freq - 1, cfg.encoder_layers, cfg.moe_freq))
    return []


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
        self.activation = DENSE_ACTIVATIONS[activation]
        self.activation_dropout = nn.Dropout(activation_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_dropout(self.activation(self.fc1(x))))


class EncoderLayer(nn.Module):
    """Self-attention + FFN, each with residual and LayerNorm (post-LN, or pre-LN)."""

    def __init__(self, cfg: XMoEEncoderConfig, moe: Optional[MoELayer]):
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
        self.activation = DENSE_ACTIVATIONS[activation]
        self.layer_norm = nn.LayerNorm(dim)
        self.weight = embed_weight_VC  # shared with the embeddings, not a copy
        self.bias = nn.Parameter(torch.zeros(embed_weight_VC.shape[0]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(self.activation(self.dense(features)))
        return F.linear(x, self.weight) + self.bias  # (..., V)


@register_model("xmoe_encoder", dataclass=XMoEEncoderConfig)
class XMoEEncoderModel(BaseFairseqModel):
    """XLM-R-style masked-LM encoder with sparse (X-MoE) FFNs in chosen layers."""

    def __init__(self, cfg: XMoEEncoderConfig, vocab_size: int, padding_idx: int):
        super().__init__()
        self.cfg = cfg
        self.padding_idx = padding_idx
        C = cfg.encoder_embed_dim
        self.embed_tokens = nn.Embedding(vocab_size, C, padding_idx=padding_idx)
        self.embed_positions = nn.Embedding(cfg.max_positions, C)
        self.embed_languages = nn.Embedding(cfg.num_languages, C) if cfg.num_languages > 0 else None
        self.embed_scale = math.sqrt(C) if cfg.scale_embedding else 1.0
        self.layernorm_embedding = None if cfg.no_layernorm_embedding else nn.LayerNorm(C)
        self.dropout = nn.Dropout(cfg.dropout)

        self.moe_layer_indices = moe_layer_indices(cfg)
        self.layers = nn.ModuleList(
            EncoderLayer(cfg, self._build_moe(cfg) if i in self.moe_layer_indices else None)
            for i in range(cfg.encoder_layers)
        )
        self.final_layer_norm = nn.LayerNorm(C) if cfg.encoder_normalize_before else None
        self.lm_head = MaskedLMHead(C, cfg.activation_fn, self.embed_tokens.weight)
        self._init_dense_weights()

    @staticmethod
    def _build_moe(cfg: XMoEEncoderConfig) -> MoELayer:
        ep_group, edp_group = (
            expert_parallel_groups(cfg.moe_experts) if cfg.moe_expert_parallel else (None, None)
        )
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
            process_group=ep_group,
            expert_data_parallel_group=edp_group,
            normalize=not cfg.moe_no_normalize,
            second_expert_policy=cfg.moe_second_expert_policy,
            batch_prioritized=cfg.moe_batch_prioritized,
        )

    def _init_dense_weights(self) -> None:
        # BERT/XLM-R init (normal std 0.02, zero biases, zero padding embedding) for everything
        # except the MoE layers, whose routers need their own init (e.g. orthogonal expert
        # embeddings, tau = 0.07) and whose experts are initialised by xmoe.moe.
        moe_modules = {id(m) for layer in self.layers if layer.is_moe for m in layer.ffn.modules()}
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

    @classmethod
    def build_model(cls, cfg: Any, task) -> "XMoEEncoderModel":
        # fairseq hands over a Namespace or a DictConfig that may lack options (a Hydra config
        # naming an --arch gets no dataclass defaults): complete it from the dataclass.
        cfg = XMoEEncoderConfig.from_namespace(cfg)
        # `--arch xmoe_encoder` (or a Hydra config with _name: xmoe_encoder) means xmoe_base.
        apply_architecture(cfg, "xmoe_base")
        task_languages = getattr(task, "num_languages", None)
        if cfg.num_languages and task_languages and cfg.num_languages < task_languages:
            raise ValueError(
                f"--num-languages {cfg.num_languages} is smaller than the task's {task_languages} languages"
            )
        dictionary = task.source_dictionary
        model = cls(cfg, len(dictionary), dictionary.pad())
        logger.info(
            "xmoe_encoder: %d layers of dim %d, MoE FFN in layers %s",
            cfg.encoder_layers,
            cfg.encoder_embed_dim,
            model.moe_layer_indices or "none",
        )
        for index in model.moe_layer_indices[:1]:
            moe = model.layers[index].ffn
            logger.info(
                "MoE layers: %d experts (gate %s, top-%d), %d on this worker (expert parallel over %d workers)",
                cfg.moe_experts,
                cfg.moe_gate,
                cfg.moe_top_k,
                moe.num_local_experts,
                cfg.moe_experts // moe.num_local_experts,
            )
        return model

    def max_positions(self) -> int:
        return self.cfg.max_positions

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
        src_lengths: Optional[torch.Tensor] = None,
        src_langs: Optional[torch.Tensor] = None,
        src_positions: Optional[torch.Tensor] = None,
        features_only: bool = False,
        return_all_hiddens: bool = False,
        masked_tokens: Optional[torch.Tensor] = None,
        **unused: Any,
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


def _register_architecture(arch: str) -> None:
    def set_defaults(cfg: Any) -> None:
        apply_architecture(cfg, arch)

    set_defaults.__name__ = f"{arch}_architecture"
    register_model_architecture("xmoe_encoder", arch)(set_defaults)


for _arch in ARCHITECTURES:
    _register_architecture(_arch)
