"""transformers models around xmoe.encoder.XMoEEncoder: `XMoEModel` (hidden states),
`XMoEForMaskedLM` (the pre-trained MLM head), `XMoEForSequenceClassification` and
`XMoEForTokenClassification` (the heads of xmoe.heads.layers). All hold the whole encoder as
`self.encoder`, so parameter names equal those of model.safetensors ("encoder.*") whichever
class loads it; the task heads add `classifier.*`.

Shape legend: B = batch size, T = sequence length, C = model dim, V = vocabulary size,
N = num_labels.

Inputs: `input_ids` (B, T) padded with config.pad_token_id (ids >= vocab_size, which the
tokenizer gives pieces dict.txt lacks, read as `<unk>`, as in pre-training); `attention_mask`
(B, T), optional (0 marks padding: the encoder finds padding by the pad id, so masked positions
are set to it); `language_ids`, for models with language embeddings: (B, T) per token, or (B,)
one language per row (what a `language_ids` column of a dataset becomes after transformers'
data collators); without it, config.default_language; `position_ids` (B, T), optional (default:
0, 1, ... over each row's real tokens).

Losses (with labels): the task's cross-entropy (`task_loss`) + config.balance_loss_weight x the
mean balance loss of the MoE layers (`balance_loss`) = `loss`. config.freeze_moe freezes the
routers, or routers and experts, when the model is built (see configuration_xmoe.py).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from xmoe.encoder import XMoEEncoder
from xmoe.heads.layers import SequenceClassificationHead, TokenClassificationHead, freeze_for_finetuning
from xmoe.heads.layers import freeze_moe_parts, mean_balance_loss, token_classification_loss, with_balance_loss
from xmoe.hf.configuration_xmoe import XMoEConfig


@dataclass
class XMoEModelOutput(BaseModelOutput):
    """BaseModelOutput plus routing: per MoE layer (in layer order), the expert each token went
    to, (B, T) long with -1 for padding and tokens over capacity, and the mean balance loss."""

    expert_indices: Optional[tuple[torch.Tensor, ...]] = None
    balance_loss: Optional[torch.Tensor] = None


@dataclass
class XMoEMaskedLMOutput(MaskedLMOutput):
    task_loss: Optional[torch.Tensor] = None
    expert_indices: Optional[tuple[torch.Tensor, ...]] = None
    balance_loss: Optional[torch.Tensor] = None


@dataclass
class XMoESequenceClassifierOutput(SequenceClassifierOutput):
    task_loss: Optional[torch.Tensor] = None
    expert_indices: Optional[tuple[torch.Tensor, ...]] = None
    balance_loss: Optional[torch.Tensor] = None


@dataclass
class XMoETokenClassifierOutput(TokenClassifierOutput):
    task_loss: Optional[torch.Tensor] = None
    expert_indices: Optional[tuple[torch.Tensor, ...]] = None
    balance_loss: Optional[torch.Tensor] = None


@dataclass
class EncoderRun:
    features: torch.Tensor  # (B, T, C) features, or (B, T, V) logits
    padding_mask: torch.Tensor  # (B, T) True at padding
    hidden_states: Optional[tuple[torch.Tensor, ...]]
    expert_indices: Optional[tuple[torch.Tensor, ...]]
    balance_loss: torch.Tensor  # mean over MoE layers; 0 without any

    def routing(self) -> dict:
        has_moe = self.expert_indices is not None
        return {"expert_indices": self.expert_indices, "balance_loss": self.balance_loss if has_moe else None}


class XMoEPreTrainedModel(PreTrainedModel):
    config_class = XMoEConfig
    base_model_prefix = "encoder"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    # The losses are means over the batch: Trainer need not pass num_items_in_batch.
    accepts_loss_kwargs = False
    # lm_head.weight IS embed_tokens.weight (one Parameter); the weights file stores it once.
    _tied_weights_keys = {"encoder.lm_head.weight": "encoder.embed_tokens.weight"}
    default_freeze_moe = "none"  # config.freeze_moe = None means this

    def __init__(self, config: XMoEConfig):
        super().__init__(config)
        self.encoder = XMoEEncoder(config.encoder_config())

    def _init_weights(self, module: torch.nn.Module) -> None:
        # XMoEEncoder initializes itself when built (BERT-style dense init, the routers' own
        # init); transformers' generic init would overwrite the routers' expert embeddings.
        # A new task head gets BERT's init (the one part missing when loading an export); it is
        # matched by its Linear layers, which transformers hands to this method one by one.
        head = getattr(self, "classifier", None)
        if isinstance(module, torch.nn.Linear) and head is not None and any(module is m for m in head.modules()):
            torch.nn.init.normal_(module.weight, std=0.02)
            torch.nn.init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        # Loading may replace the parameters built (and frozen) in __init__: freeze again.
        (loaded[0] if isinstance(loaded, tuple) else loaded)._freeze()
        return loaded

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.encoder.embed_tokens

    def _freeze(self) -> None:
        freeze_moe_parts(self.encoder, self.config.freeze_moe_setting(self.default_freeze_moe))


    def _language_rows(self, language_ids: Optional[torch.Tensor], input_ids: torch.Tensor) -> Optional[torch.Tensor]:
        if self.encoder.embed_languages is None:
            return None
        if language_ids is None:
            default = self.config.default_language_id()
            return None if default is None else torch.full_like(input_ids, default)
        if language_ids.dim() == 1:  # one language per row
            return language_ids.to(input_ids.device).unsqueeze(1).expand_as(input_ids)
        return language_ids

    def _run_encoder(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        language_ids: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor],
        output_hidden_states: Optional[bool],
        features_only: bool,
    ) -> EncoderRun:
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        language_rows = self._language_rows(language_ids, input_ids)
        input_ids = input_ids.masked_fill(input_ids >= self.config.vocab_size, self.config.unk_token_id)
        if attention_mask is not None:
            input_ids = input_ids.masked_fill(attention_mask == 0, self.config.pad_token_id)
        out, extra = self.encoder(
            input_ids,
            src_langs=language_rows,
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
        return EncoderRun(out, extra["padding_mask"], hidden_states, expert_indices, mean_balance_loss(moe_aux, out))

    def _loss(self, task_loss: Optional[torch.Tensor], run: EncoderRun) -> Optional[torch.Tensor]:
        return None if task_loss is None else with_balance_loss(task_loss, run.balance_loss, self.config.balance_loss_weight)


class _XMoETaskModel(XMoEPreTrainedModel):
    """A task head on the encoder: router and experts frozen by default (the paper's fine-tuning
    setting), and the MLM head's own layers, unused by the task, frozen as well."""

    default_freeze_moe = "router_and_experts"

    def _freeze(self) -> None:
        freeze_for_finetuning(self.encoder, self.config.freeze_moe_setting(self.default_freeze_moe))


class XMoEModel(XMoEPreTrainedModel):
    """The encoder's hidden states: last_hidden_state (B, T, C) and, with
    output_hidden_states, the embeddings output and every layer's output (layers + 1 of them)."""

    def __init__(self, config: XMoEConfig):
        super().__init__(config)
        self._freeze()
        self.post_init()

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
        run = self._run_encoder(input_ids, attention_mask, language_ids, position_ids, output_hidden_states, True)
        output = XMoEModelOutput(last_hidden_state=run.features, hidden_states=run.hidden_states, **run.routing())
        return output if return_dict is not False else output.to_tuple()


class XMoEForMaskedLM(XMoEPreTrainedModel):
    """The pre-trained masked-LM head: logits (B, T, V); with labels (B, T) (-100 = not
    predicted) the cross-entropy as task_loss and loss = task_loss + balance_loss_weight x
    balance_loss, the pre-training objective (its criterion's default weight is 0.01 too)."""

    def __init__(self, config: XMoEConfig):
        super().__init__(config)
        self._freeze()
        self.post_init()

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
        run = self._run_encoder(input_ids, attention_mask, language_ids, position_ids, output_hidden_states, False)
        task_loss = None
        if labels is not None:
            task_loss = F.cross_entropy(run.features.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        output = XMoEMaskedLMOutput(
            loss=self._loss(task_loss, run), logits=run.features, hidden_states=run.hidden_states,
            task_loss=task_loss, **run.routing(),
        )
        return output if return_dict is not False else output.to_tuple()


class XMoEForSequenceClassification(_XMoETaskModel):
    """One label per sequence or sentence pair: logits (B, N). Labels (B,): class ids
    (cross-entropy), floats with num_labels 1 (regression, MSE), or (B, N) floats with
    problem_type "multi_label_classification" (BCE), as transformers' other encoders."""

    def __init__(self, config: XMoEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.classifier = SequenceClassificationHead(
            config.hidden_size, config.num_labels, config.classifier_pooling, config.classifier_dropout
        )
        self._freeze()
        self.post_init()

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
        run = self._run_encoder(input_ids, attention_mask, language_ids, position_ids, output_hidden_states, True)
        logits_BN = self.classifier(run.features, run.padding_mask)
        task_loss = None if labels is None else self._task_loss(logits_BN, labels)
        output = XMoESequenceClassifierOutput(
            loss=self._loss(task_loss, run), logits=logits_BN, hidden_states=run.hidden_states,
            task_loss=task_loss, **run.routing(),
        )
        return output if return_dict is not False else output.to_tuple()

    def _task_loss(self, logits_BN: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "regression":
            return F.mse_loss(logits_BN.squeeze(-1).float(), labels.float())
        if self.config.problem_type == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits_BN.float(), labels.float())
        return F.cross_entropy(logits_BN.float(), labels.view(-1))


class XMoEForTokenClassification(_XMoETaskModel):
    """One label per token (POS, NER): logits (B, T, N); labels (B, T) with -100 where no
    label applies (padding never counts)."""

    def __init__(self, config: XMoEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.classifier = TokenClassificationHead(config.hidden_size, config.num_labels, config.classifier_dropout)
        self._freeze()
        self.post_init()

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
        run = self._run_encoder(input_ids, attention_mask, language_ids, position_ids, output_hidden_states, True)
        logits_BTN = self.classifier(run.features)
        task_loss = None if labels is None else token_classification_loss(logits_BTN, labels, run.padding_mask)
        output = XMoETokenClassifierOutput(
            loss=self._loss(task_loss, run), logits=logits_BTN, hidden_states=run.hidden_states,
            task_loss=task_loss, **run.routing(),
        )
        return output if return_dict is not False else output.to_tuple()
