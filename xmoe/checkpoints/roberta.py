"""A fairseq RoBERTa / XLM-R checkpoint as a dense xmoe_encoder network.

fairseq's `roberta` model (XLM-R is a roberta model with a larger vocabulary) and
xmoe.encoder.XMoEEncoder are the same network up to names and three layout differences:

- attention: fairseq keeps q_proj, k_proj and v_proj, each (C, C); XMoEEncoder has one fused
  qkv_proj (3C, C) in q, k, v order. Checkpoints from before the split hold one
  in_proj_weight (3C, C), already in that order.
- positions: fairseq's learned positions start after the padding index: the token at position p
  (0-based, padding skipped) reads row p + padding_idx + 1, so a table of max_positions +
  padding_idx + 1 rows (514 for 512 positions); rows 0..padding_idx are never read and dropped.
- the LM head's projection is the token embedding matrix in both models (fairseq saves it a
  second time under lm_head.weight); a head trained untied cannot be represented.

The rest maps one to one: layernorm_embedding (called emb_layer_norm in old checkpoints),
post-LN layers or pre-LN layers with their final LayerNorm, the LM head's dense + LayerNorm +
bias. Tensors that have no place in XMoEEncoder (classification heads, sinusoidal positions,
adaptive inputs, ...) are refused with a message naming the tensor, never dropped silently.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

# fairseq activation names -> xmoe.moe.ACTIVATIONS (fairseq's gelu_accurate / gelu_fast is the
# tanh approximation; its "swish" is SiLU).
ACTIVATION_NAMES = {"gelu": "gelu", "gelu_accurate": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu", "swish": "silu"}
PADDING_IDX = 1  # fairseq's Dictionary always puts <pad> at index 1
ENCODER = "encoder.sentence_encoder."
HEAD = "encoder.lm_head."


class RobertaMappingError(ValueError):
    """A roberta checkpoint that XMoEEncoder cannot represent; the message names the tensor or option."""


def is_roberta_checkpoint(state: dict) -> bool:
    """Whether a fairseq checkpoint's model is a roberta-style encoder (by its tensor names)."""
    return any(k.startswith((ENCODER, "decoder.sentence_encoder.")) for k in state.get("model", {}))


def roberta_model_args(state: dict) -> dict[str, Any]:
    """The model options a roberta checkpoint was built with (Hydra-era cfg.model or old args)."""
    cfg = state.get("cfg") or {}
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if model is None:
        model = state.get("args")
    if isinstance(model, argparse.Namespace):
        return dict(vars(model))
    return dict(model or {})


def _renamed(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Today's fairseq names for tensors of older roberta checkpoints (what fairseq's own
    upgrade_state_dict_named does): decoder. -> encoder., emb_layer_norm -> layernorm_embedding,
    layer_norms.0/1 -> self_attn_layer_norm / final_layer_norm."""
    renamed = {}
    for key, tensor in weights.items():
        if key.startswith("decoder."):
            key = "encoder." + key[len("decoder.") :]
        key = key.replace(".emb_layer_norm.", ".layernorm_embedding.")
        key = key.replace(".layer_norms.0.", ".self_attn_layer_norm.").replace(".layer_norms.1.", ".final_layer_norm.")
        renamed[key] = tensor
    return renamed


class _Tensors:
    """The checkpoint's tensors; take() marks each one used, so leftovers can be refused by name."""

    def __init__(self, weights: dict[str, torch.Tensor], path: str):
        self.weights = weights
        self.path = path
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.weights

    def take(self, key: str) -> torch.Tensor:
        if key not in self.weights:
            raise RobertaMappingError(f"roberta checkpoint {self.path!r} has no tensor {key}")
        self.used.add(key)
        return self.weights[key]

    def leftovers(self) -> list[str]:
        # the encoder's "version" buffer only records fairseq's state-dict format
        return sorted(k for k in self.weights if k not in self.used and not k.endswith(".version"))


def _attention_in_projection(tensors: _Tensors, prefix: str, suffix: str) -> torch.Tensor:
    """q, k, v stacked into XMoEEncoder's fused (3C, ...) projection, in q, k, v order."""
    fused = f"{prefix}in_proj_{suffix}"
    if tensors.has(fused):
        return tensors.take(fused)
    return torch.cat([tensors.take(f"{prefix}{name}_proj.{suffix}") for name in ("q", "k", "v")], dim=0)


def _activation(args: dict, path: str) -> str:
    name = str(args.get("activation_fn") or "gelu")
    if name not in ACTIVATION_NAMES:
        raise RobertaMappingError(
            f"roberta checkpoint {path!r}: activation_fn {name!r} has no counterpart in xmoe_encoder "
            f"(supported: {', '.join(sorted(ACTIVATION_NAMES))})"
        )
    return ACTIVATION_NAMES[name]


def map_roberta(state: dict, path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(xmoe_encoder model options, XMoEEncoder state dict) of a dense network equal to the
    roberta checkpoint `state`. Raises RobertaMappingError naming the first tensor or option
    that cannot be mapped."""
    args = roberta_model_args(state)
    tensors = _Tensors(_renamed(state["model"]), path)
    out: dict[str, torch.Tensor] = {}

    if not tensors.has(ENCODER + "embed_positions.weight"):
        # sinusoidal positions have no weights (older fairseq saved a _float_tensor buffer)
        sinusoidal = args.get("encoder_learned_pos") is False or tensors.has(ENCODER + "embed_positions._float_tensor")
        raise RobertaMappingError(
            f"roberta checkpoint {path!r} has no tensor {ENCODER}embed_positions.weight"
            + (": its positions are sinusoidal, xmoe_encoder has learned positions only" if sinusoidal else "")
        )
    embed_VC = tensors.take(ENCODER + "embed_tokens.weight")
    _, dim = embed_VC.shape
    out["embed_tokens.weight"] = embed_VC
    positions = tensors.take(ENCODER + "embed_positions.weight")
    max_positions = positions.shape[0] - (PADDING_IDX + 1)
    if max_positions < 1:
        raise RobertaMappingError(f"roberta checkpoint {path!r}: {ENCODER}embed_positions.weight has too few rows")
    out["embed_positions.weight"] = positions[PADDING_IDX + 1 :]
    has_layernorm_embedding = tensors.has(ENCODER + "layernorm_embedding.weight")
    if has_layernorm_embedding:
        for name in ("weight", "bias"):
            out[f"layernorm_embedding.{name}"] = tensors.take(f"{ENCODER}layernorm_embedding.{name}")

    num_layers = 0
    while tensors.has(f"{ENCODER}layers.{num_layers}.fc1.weight"):
        num_layers += 1
    if num_layers == 0:
        raise RobertaMappingError(f"roberta checkpoint {path!r} has no tensor {ENCODER}layers.0.fc1.weight")
    for i in range(num_layers):
        src, dst = f"{ENCODER}layers.{i}.", f"layers.{i}."
        for name in ("weight", "bias"):
            out[f"{dst}self_attn.qkv_proj.{name}"] = _attention_in_projection(tensors, src + "self_attn.", name)
            out[f"{dst}self_attn.out_proj.{name}"] = tensors.take(f"{src}self_attn.out_proj.{name}")
            out[f"{dst}self_attn_layer_norm.{name}"] = tensors.take(f"{src}self_attn_layer_norm.{name}")
            out[f"{dst}ffn.fc1.{name}"] = tensors.take(f"{src}fc1.{name}")
            out[f"{dst}ffn.fc2.{name}"] = tensors.take(f"{src}fc2.{name}")
            out[f"{dst}final_layer_norm.{name}"] = tensors.take(f"{src}final_layer_norm.{name}")
    normalize_before = tensors.has(ENCODER + "layer_norm.weight")
    if normalize_before:
        for name in ("weight", "bias"):
            out[f"final_layer_norm.{name}"] = tensors.take(f"{ENCODER}layer_norm.{name}")
    if bool(args.get("encoder_normalize_before", normalize_before)) != normalize_before:
        raise RobertaMappingError(
            f"roberta checkpoint {path!r}: encoder_normalize_before={args.get('encoder_normalize_before')} "
            f"but {ENCODER}layer_norm.weight is {'present' if normalize_before else 'missing'}"
        )

    for name in ("dense.weight", "dense.bias", "layer_norm.weight", "layer_norm.bias", "bias"):
        out[f"lm_head.{name}"] = tensors.take(HEAD + name)
    head_VC = tensors.take(HEAD + "weight") if tensors.has(HEAD + "weight") else embed_VC
    if head_VC.shape != embed_VC.shape or not torch.equal(head_VC, embed_VC):
        raise RobertaMappingError(
            f"roberta checkpoint {path!r}: {HEAD}weight differs from the token embeddings "
            "(trained with --untie-weights-roberta); xmoe_encoder ties its LM head to them"
        )
    out["lm_head.weight"] = embed_VC

    leftovers = tensors.leftovers()
    if leftovers:
        raise RobertaMappingError(
            f"roberta checkpoint {path!r}: cannot map tensor {leftovers[0]} {tuple(tensors.weights[leftovers[0]].shape)} "
            f"to xmoe_encoder ({len(leftovers)} unmapped tensor(s); classification heads and other extras are not converted)"
        )
    heads = args.get("encoder_attention_heads")
    if not heads:
        raise RobertaMappingError(
            f"roberta checkpoint {path!r}: its config does not say encoder_attention_heads (no cfg.model or args)"
        )
    ffn_dim = out["layers.0.ffn.fc1.weight"].shape[0]
    options = dict(
        encoder_layers=num_layers,
        encoder_embed_dim=dim,
        encoder_ffn_embed_dim=ffn_dim,
        encoder_attention_heads=int(heads),
        max_positions=max_positions,
        num_languages=0,
        # roberta's default is --no-scale-embedding (XLM-R does not scale)
        scale_embedding=not bool(args.get("no_scale_embedding", True)),
        no_layernorm_embedding=not has_layernorm_embedding,
        encoder_normalize_before=normalize_before,
        activation_fn=_activation(args, path),
        dropout=float(args.get("dropout", 0.1)),
        attention_dropout=float(args.get("attention_dropout", 0.1)),
        activation_dropout=float(args.get("activation_dropout", 0.0)),
    )
    return options, out
