"""`XMoEConfig`: the transformers configuration of an exported X-MoE encoder.

Its fields are exactly xmoe.encoder.EncoderConfig's (one source of truth: they are read from
that dataclass), plus the manifest's language codes, the usual token ids, and what fine-tuning
needs (each also settable as `from_pretrained(path, name=value)`):

- default_language: the language (code or id) that models with language embeddings use when
  no `language_ids` input is given, e.g. in pipelines; xmoe-export sets the manifest's first.
- freeze_moe: "none", "router" or "router_and_experts" (the paper's fine-tuning setting); True
  means "router_and_experts", False "none". None (the default) is each class's own default:
  the task heads freeze router and experts, XMoEModel / XMoEForMaskedLM freeze nothing.
- balance_loss_weight: weight of the MoE balance loss added to the task (or MLM) loss when
  labels are given; 0.01 is the paper's alpha and pre-training's default.
- classifier_pooling ("first": the `<s>` state, or "mean"), classifier_dropout: the sequence
  classification head.
"""

from dataclasses import MISSING, fields
from typing import Any, Optional, Union

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

    # Output fields a Trainer should not collect as predictions (its predictions are the logits).
    keys_to_ignore_at_inference = ["task_loss", "balance_loss", "expert_indices", "hidden_states"]

    def __init__(
        self,
        languages: Optional[list[str]] = None,
        default_language: Optional[Union[str, int]] = None,
        freeze_moe: Optional[Union[str, bool]] = None,
        balance_loss_weight: float = 0.01,
        classifier_pooling: str = "first",
        classifier_dropout: float = 0.1,
        **kwargs: Any,
    ):
        for name, default in _encoder_field_defaults().items():
            setattr(self, name, kwargs.pop(name, default))
        self.languages = languages  # manifest order: the language id of a code is its index
        self.default_language = default_language
        self.freeze_moe = freeze_moe
        self.balance_loss_weight = balance_loss_weight
        self.classifier_pooling = classifier_pooling
        self.classifier_dropout = classifier_dropout
        kwargs.setdefault("unk_token_id", 3)
        kwargs.setdefault("bos_token_id", 0)
        kwargs.setdefault("pad_token_id", self.padding_idx if self.padding_idx is not None else 1)
        kwargs.setdefault("eos_token_id", 2)
        # The MLM head's projection is the token embedding matrix (stored once in the weights).
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)

    def default_language_id(self) -> Optional[int]:
        """The id of default_language (None: no default)."""
        language = self.default_language
        if language is None or isinstance(language, int):
            return language
        if not self.languages or language not in self.languages:
            raise ValueError(f"default_language {language!r} is not one of the model's languages {self.languages}")
        return self.languages.index(language)

    def freeze_moe_setting(self, class_default: str) -> str:
        """freeze_moe as one of "none", "router", "router_and_experts"."""
        if self.freeze_moe is None:
            return class_default
        if isinstance(self.freeze_moe, bool):
            return "router_and_experts" if self.freeze_moe else "none"
        return self.freeze_moe

    def encoder_config(self) -> EncoderConfig:
        values = {f.name: getattr(self, f.name) for f in fields(EncoderConfig)}
        return EncoderConfig.from_dict(values)
