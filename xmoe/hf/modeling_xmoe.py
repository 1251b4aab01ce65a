"""transformers models around xmoe.encoder.XMoEEncoder: `XMoEModel` (hidden states) and
`XMoEForMaskedLM` (the pre-trained MLM head). Both hold the whole encoder as `self.encoder`,
so parameter names equal those of model.safetensors ("encoder.*") whichever class loads it.

Shape legend: B = batch size, T = sequence length, C = model dim, V = vocabulary size.

Inputs: `input_ids` (B, T) padded with config.pad_token_id; `attention_mask` (B, T), optional
(0 marks padding: the encoder finds padding by the pad id, so masked positions are set to it);
`language_ids` (B, T), the manifest's language ids, for models with language embeddings;
`position_ids` (B, T), optional (default: 0, 1, ... over each row's real tokens).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

from xmoe.encoder import XMoEEncoder
from xmoe.hf.configuration_xmoe import XMoEConfig


@dataclass
class XMoEModelOutput(BaseModelOutput):
    """BaseModelOutput plus routing: per MoE layer (in layer order), the expert each token went
    to, (B, T) long with -1 for padding and tokens over capacity, and the mean balance loss."""

    expert_indices: Optional[tuple[torch.Tensor, ...]] = None
    balance_loss: Optional[torch.Tensor] = None


@dataclass
class XMoEMaskedLMOutput(MaskedLMOutput):
    expert_indices: Optional[tuple[torch.Tensor, ...]] = None
    balance_loss: Optional[torch.Tensor] = None


class XMoEPreTrainedModel(PreTrainedModel):
    config_class = XMoEConfig
    base_model_prefix = "encoder"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    # lm_head.weight IS embed_tokens.weight (one Parameter); the weights file stores it once.
    _tied_weights_keys = {"encoder.lm_head.weight": "encoder.embed_tokens.weight"}

    def __init__(self, config: XMoEConfig):
        super().__init__(config)
        self.encoder = XMoEEncoder(config.encoder_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # XMoEEncoder initializes itself when built (BERT-style dense init, the routers' own
        # init); transformers' generic init would overwrite the routers' expert embeddings.
        pass

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.encoder.embed_tokens

    def _run_encoder(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        language_ids: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor],
        output_hidden_states: bool,
        features_only: bool,
    ):
        if attention_mask is not None:
            input_ids = input_ids.masked_fill(attention_mask == 0, self.config.pad_token_id)
        out, extra = self.encoder(
            input_ids,
            src_langs=language_ids,
            src_positions=position_ids,
            features_only=features_only,
            return_all_hiddens=output_hidden_states,
        )
        hidden_states = None
        if output_hidden_states:
            # inner_states: embeddings output, then every layer's output, each (T, B, C)
            hidden_states = tuple(h.transpose(0, 1) for h in extra["inner_states"])
        moe_aux = extra["moe_aux"]
        expert_indices = tuple(aux.expert_index for aux in moe_aux) or None
        balance_loss = torch.stack([aux.balance_loss for aux in moe_aux]).mean() if moe_aux else None
        return out, hidden_states, expert_indices, balance_loss


class XMoEModel(XMoEPreTrainedModel):
    """The encoder's hidden states: last_hidden_state (B, T, C) and, with
    output_hidden_states, the embeddings output and every layer's output (layers + 1 of them)."""

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        language_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **unused,
    ):
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        features_BTC, hidden_states, expert_indices, balance_loss = self._run_encoder(
            input_ids, attention_mask, language_ids, position_ids, output_hidden_states, features_only=True
        )
        output = XMoEModelOutput(
            last_hidden_state=features_BTC,
            hidden_states=hidden_states,
            expert_indices=expert_indices,
            balance_loss=balance_loss,
        )
        return output if return_dict is not False else output.to_tuple()


class XMoEForMaskedLM(XMoEPreTrainedModel):
    """The pre-trained masked-LM head: logits (B, T, V); loss when labels (B, T) are given
    (-100 = not predicted)."""

    def get_output_embeddings(self) -> None:
        # The projection is a plain tensor shared with the embeddings, not an nn.Linear.
        return None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        language_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **unused,
    ):
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        logits_BTV, hidden_states, expert_indices, balance_loss = self._run_encoder(
            input_ids, attention_mask, language_ids, position_ids, output_hidden_states, features_only=False
        )
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        output = XMoEMaskedLMOutput(
            loss=loss,
            logits=logits_BTV,
            hidden_states=hidden_states,
            expert_indices=expert_indices,
            balance_loss=balance_loss,
        )
        return output if return_dict is not False else output.to_tuple()
