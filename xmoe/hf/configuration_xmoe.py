"""`XMoEConfig`: the transformers configuration of an exported X-MoE encoder.

Its fields are exactly xmoe.encoder.EncoderConfig's (one source of truth: they are read from
that dataclass), plus the manifest's language codes and the usual token ids.
"""

from dataclasses import MISSING, fields
from typing import Any, Optional

from transformers import PretrainedConfig

from xmoe.encoder import EncoderConfig


def _encoder_field_defaults() -> dict[str, Any]:
    defaults = {}
    for f in fields(EncoderConfig):
        if f.default is not MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not MISSING:
            defaults[f.name] = f.default_factory()
        else:
            defaults[f.name] = None  # vocab_size, padding_idx: set by the exported config.json
    return defaults


class XMoEConfig(PretrainedConfig):
    model_type = "xmoe"
    # The names other transformers code looks for.
    attribute_map = {
        "hidden_size": "encoder_embed_dim",
        "num_hidden_layers": "encoder_layers",
        "num_attention_heads": "encoder_attention_heads",
        "intermediate_size": "encoder_ffn_embed_dim",
        "max_position_embeddings": "max_positions",
    }

    def __init__(self, languages: Optional[list[str]] = None, **kwargs: Any):
        for name, default in _encoder_field_defaults().items():
            setattr(self, name, kwargs.pop(name, default))
        self.languages = languages  # manifest order: the language id of a code is its index
        kwargs.setdefault("bos_token_id", 0)
        kwargs.setdefault("pad_token_id", self.padding_idx if self.padding_idx is not None else 1)
        kwargs.setdefault("eos_token_id", 2)
        # The MLM head's projection is the token embedding matrix (stored once in the weights).
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)

    def encoder_config(self) -> EncoderConfig:
        values = {f.name: getattr(self, f.name) for f in fields(EncoderConfig)}
        return EncoderConfig.from_dict(values)
