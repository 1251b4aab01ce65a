"""Load an exported X-MoE folder (xmoe-export) with torch alone: no fairseq, no transformers.

    from xmoe import hub
    model = hub.load("exported/xmoe-base")           # XMoEHubModel, encoder in eval mode
    batch = model.encode(["Hello world.", "Hallo Welt."], languages=["en", "de"])
    hidden_BTC = model.features(["Hello world."])       # last layer, (B, T, C)
    sentence_BC = model.sentence_embeddings(["Hello world."], layer=6)   # mean over real tokens

Shape legend: B = sentences, T = longest row in tokens, C = model dim, L = layers.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields, replace
from typing import Any, Optional, Sequence, Union

import torch

from xmoe.encoder import EncoderConfig, XMoEEncoder
from xmoe.tokenizer import EncodedBatch, Language, XMoETokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHT_PREFIX = "encoder."
TIED_KEY = "lm_head.weight"  # same tensor as embed_tokens.weight, stored once

Inputs = Union[Sequence[Union[str, tuple[str, str]]], EncodedBatch, torch.Tensor]


class XMoEHubModel:
    """An exported encoder with its tokenizer.

    encoder: XMoEEncoder in eval mode; tokenizer: XMoETokenizer; config: EncoderConfig;
    languages: the manifest's language codes (None when the export had no manifest).
    """

    def __init__(self, encoder: XMoEEncoder, tokenizer: XMoETokenizer, config: EncoderConfig, path: str):
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.config = config
        self.path = path

    @property
    def languages(self) -> Optional[list[str]]:
        return self.tokenizer.languages

    @property
    def device(self) -> torch.device:
        return self.encoder.embed_tokens.weight.device

    def encode(self, texts: Sequence[Union[str, tuple[str, str]]], languages=None) -> EncodedBatch:
        """Tokenize and pad (on the model's device). languages: one for all texts or one per
        text (codes or ids); used only by models with language embeddings."""
        if self.config.num_languages == 0:
            languages = None
        return self.tokenizer.batch(texts, languages).to(self.device)

    @torch.no_grad()
    def features(self, inputs: Inputs, layer: int = -1, languages=None) -> torch.Tensor:
        """Hidden states (B, T, C) of `layer`: 0 = the embeddings' output, i = after layer i,
        -1 = the last (after the final LayerNorm of pre-LN models). Inputs: texts, (a, b) pairs,
        an EncodedBatch, or a (B, T) tensor of ids padded with the pad id. Padding rows hold 0."""
        batch = self._as_batch(inputs, languages)
        num_layers = self.config.encoder_layers
        if not -(num_layers + 1) <= layer <= num_layers:
            raise ValueError(f"layer {layer} outside -{num_layers + 1}..{num_layers} for a {num_layers}-layer model")
        last = layer in (-1, num_layers)
        features_BTC, extra = self.encoder(
            batch.src_tokens, src_langs=batch.src_langs, features_only=True, return_all_hiddens=not last
        )
        if last:
            return features_BTC
        return extra["inner_states"][layer].transpose(0, 1)  # (T, B, C) -> (B, T, C)

    @torch.no_grad()
    def sentence_embeddings(self, inputs: Inputs, layer: int = -1, languages=None, pooling: str = "mean") -> torch.Tensor:
        """(B, C): the mean of `layer`'s hidden states over each row's real tokens (`<s>` and
        `</s>` included), or the `<s>` state with pooling="first"."""
        batch = self._as_batch(inputs, languages)
        hidden_BTC = self.features(batch, layer)
        if pooling == "first":
            return hidden_BTC[:, 0]
        if pooling != "mean":
            raise ValueError(f"pooling must be 'mean' or 'first', got {pooling!r}")
        keep_BT1 = (~batch.padding_mask.to(hidden_BTC.device)).unsqueeze(-1).to(hidden_BTC.dtype)
        return (hidden_BTC * keep_BT1).sum(1) / keep_BT1.sum(1).clamp(min=1)

    def _as_batch(self, inputs: Inputs, languages) -> EncodedBatch:
        if isinstance(inputs, EncodedBatch):
            return inputs.to(self.device)
        if isinstance(inputs, torch.Tensor):
            if inputs.dim() != 2:
                raise ValueError(f"token ids must be (B, T), got shape {tuple(inputs.shape)}")
            tokens_BT = inputs.long()
            lengths = tokens_BT.ne(self.tokenizer.pad_id).sum(1)
            langs_BT = None
            if languages is not None and self.config.num_languages:
                langs_BT = self.tokenizer.language_rows(languages, tokens_BT)
            batch = EncodedBatch(tokens_BT, langs_BT, lengths)
            return batch.to(self.device)
        return self.encode(inputs, languages)


# Encoder fields added after the first export format, with the value that keeps older exports'
# behaviour. Every other field must be in config.json: guessing it could build another network.
ADDED_AFTER_FIRST_EXPORT: dict[str, Any] = {"moe_renormalize_gates": False}


def read_config(path: str) -> tuple[EncoderConfig, dict[str, Any]]:
    """(EncoderConfig, the whole config.json) of an exported folder."""
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} is not an exported xmoe model: {CONFIG_FILE} is missing")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("model_type") != "xmoe":
        raise ValueError(f"{config_path}: model_type is {config.get('model_type')!r}, not 'xmoe'")
    names = [f.name for f in fields(EncoderConfig)]
    # Exports made before a field existed lack it; such a field's default is what those models did.
    values = {**ADDED_AFTER_FIRST_EXPORT, **{n: config[n] for n in names if n in config}}
    missing = [n for n in names if n not in values]
    if missing:
        raise ValueError(f"{config_path} lacks the encoder fields {missing} (exported by another xmoe version?)")
    return EncoderConfig.from_dict(values), config


def load_weights(encoder: XMoEEncoder, weights_path: str) -> None:
    """Load model.safetensors into `encoder`, with a clear error for any key or shape mismatch."""
    from safetensors.torch import load_file

    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{weights_path} is missing")
    stored = load_file(weights_path)
    expected = {k: v for k, v in encoder.state_dict().items() if k != TIED_KEY}
    weights = {k[len(WEIGHT_PREFIX):]: v for k, v in stored.items() if k.startswith(WEIGHT_PREFIX)}
    unexpected = sorted(set(stored) - {WEIGHT_PREFIX + k for k in expected})
    missing = sorted(set(expected) - set(weights))
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not match config.json: missing {_few(missing)}, unexpected {_few(unexpected)}"
        )
    mismatched = [
        f"{WEIGHT_PREFIX}{key} {tuple(weights[key].shape)} (config.json: {tuple(expected[key].shape)})"
        for key in sorted(weights)
        if weights[key].shape != expected[key].shape
    ]
    if mismatched:
        raise ValueError(f"{weights_path}: shapes do not fit config.json: {_few(mismatched, limit=3)}")
    result = encoder.load_state_dict(weights, strict=False)
    assert list(result.missing_keys) == [TIED_KEY] and not result.unexpected_keys, result


def _few(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def load(
    path: str, device: Union[str, torch.device] = "cpu", eval_capacity_factor: Optional[float] = None
) -> XMoEHubModel:
    """Load an exported folder: encoder (eval mode, on `device`), tokenizer, config.

    eval_capacity_factor overrides the exported moe_eval_capacity_factor: in eval mode a token
    over an expert's capacity skips the expert, so with a capacity its features can depend on
    the other sentences of its batch; <= 0 (dropless) makes every sentence's features the same
    in any batch, at the cost of uneven expert batches.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder")
    encoder_cfg, _ = read_config(path)
    if eval_capacity_factor is not None:
        encoder_cfg = replace(encoder_cfg, moe_eval_capacity_factor=eval_capacity_factor)
    tokenizer = XMoETokenizer.from_pretrained(path, max_positions=encoder_cfg.max_positions)
    if len(tokenizer) != encoder_cfg.vocab_size:
        raise ValueError(
            f"{path}: the dictionary gives {len(tokenizer)} ids but config.json says vocab_size {encoder_cfg.vocab_size}"
        )
    encoder = XMoEEncoder(encoder_cfg)
    load_weights(encoder, os.path.join(path, WEIGHTS_FILE))
    return XMoEHubModel(encoder.to(device).eval(), tokenizer, encoder_cfg, path)
