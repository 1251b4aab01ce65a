"""Fine-tuning heads on XMoEEncoder (plain torch): sentence classification and token tagging.

    from xmoe.heads import XMoEForSequenceClassification
    model = XMoEForSequenceClassification.from_pretrained("exported/xmoe-base", num_labels=3,
                                                          freeze_experts=True)
    out = model(**batch.model_inputs(), labels=labels_B)
    out.loss.backward()

Routing at fine-tuning. The paper freezes "all the parameters of experts, including both the
router and expert networks" while fine-tuning, and keeps the balance loss on:
- freeze_routing=True freezes the routers (projection, expert embeddings, temperature);
- freeze_experts=True freezes routers AND expert FFNs (the paper's setting);
- balance_loss_weight (default 0.01, the paper's alpha) adds weight x balance loss to the task
  loss. With a frozen router the balance loss cannot move the router, but it is not inert: it
  is a function of the token representations that reach the router, so its gradient still
  flows into every trainable layer below an MoE layer and keeps those representations spread
  over the experts. It is reported either way (HeadOutput.balance_loss); weight 0 turns it off.

Shape legend: B = batch size, T = sequence length, C = model dim, N = num_labels,
E = experts per MoE layer, L = MoE layers.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from xmoe.encoder import XMoEEncoder
from xmoe.heads.layers import (  # noqa: F401 (re-exported: the task heads' building blocks)
    FREEZE_MOE_CHOICES,
    IGNORE_INDEX,
    POOLINGS,
    SequenceClassificationHead,
    TokenClassificationHead,
    freeze_for_finetuning,
    mean_balance_loss,
    token_classification_loss,
    with_balance_loss,
)
from xmoe.moe import MoEAux

HEAD_CONFIG_FILE = "head_config.json"
HEAD_WEIGHTS_FILE = "head.safetensors"


@dataclass
class HeadConfig:
    """How a head is built on the encoder (saved as head_config.json next to an exported model)."""

    task: str  # "sequence_classification" or "token_classification"
    num_labels: int
    labels: Optional[list[str]] = None  # label names, in id order
    pooling: str = "first"  # sequence classification: "<s>" state ("first") or mean over real tokens
    dropout: float = 0.1
    freeze_routing: bool = False
    freeze_experts: bool = False
    balance_loss_weight: float = 0.01


@dataclass
class HeadOutput:
    logits: torch.Tensor  # (B, N) sequence classification, (B, T, N) token classification
    loss: Optional[torch.Tensor]  # task_loss + balance_loss_weight x balance_loss (with labels)
    task_loss: Optional[torch.Tensor]  # cross-entropy (with labels)
    balance_loss: torch.Tensor  # mean over MoE layers, unweighted; 0 for a dense encoder
    routing: dict[str, Any] = field(default_factory=dict)  # see routing_stats


def routing_stats(moe_aux: list[MoEAux]) -> dict[str, Any]:
    """Per MoE layer, detached: expert_fraction (L, E) share of routed tokens per expert,
    dropped_fraction (L,) share over capacity, expert_index: list of (B, T), -1 = padding/dropped."""
    if not moe_aux:
        return {}
    return {
        "expert_fraction": torch.stack([aux.stats["expert_fraction"] for aux in moe_aux]),
        "dropped_fraction": torch.tensor([float(aux.stats["dropped_fraction"]) for aux in moe_aux]),
        "expert_index": [aux.expert_index for aux in moe_aux],
    }


# Head weights saved before the heads became modules of their own (xmoe 0.1.0 runs).
_LEGACY_HEAD_KEYS = {
    **{f"{layer}.{kind}": f"classifier.{layer}.{kind}" for layer in ("dense", "out_proj") for kind in ("weight", "bias")},
    "classifier.weight": "classifier.out_proj.weight",
    "classifier.bias": "classifier.out_proj.bias",
}


def _upgrade_head_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_LEGACY_HEAD_KEYS.get(key, key): value for key, value in state.items()}


def save_with_head(out_dir: str, exported_dir: str, encoder: XMoEEncoder, head_state: dict[str, torch.Tensor],
                   head_config: dict[str, Any]) -> None:
    """An exported folder (xmoe.hub.load reads it) holding a fine-tuned encoder and its head: the
    files of `exported_dir` (config, tokenizer, code), the encoder's weights as model.safetensors,
    the head's as head.safetensors and head_config.json. Shared by the plain-torch heads' save()
    and xmoe-finetune's best/ folder, so both load with from_pretrained."""
    import shutil

    from safetensors.torch import save_file

    from xmoe.export import WEIGHTS_FILE, export_weights

    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(exported_dir):
        source = os.path.join(exported_dir, name)
        if os.path.isfile(source) and name not in (WEIGHTS_FILE, HEAD_WEIGHTS_FILE, HEAD_CONFIG_FILE):
            shutil.copyfile(source, os.path.join(out_dir, name))
    save_file(export_weights(encoder), os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    head_state = {k: v.detach().contiguous().cpu() for k, v in head_state.items()}
    save_file(head_state, os.path.join(out_dir, HEAD_WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, HEAD_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(head_config, f, indent=2)


class _EncoderWithHead(nn.Module):
    """Encoder + task head; applies the freezing options and adds the balance loss."""

    task = ""

    def __init__(self, encoder: XMoEEncoder, config: HeadConfig):
        super().__init__()
        self.encoder = encoder
        self.config = config
        freeze = "router_and_experts" if config.freeze_experts else "router" if config.freeze_routing else "none"
        self.frozen_parameters = freeze_for_finetuning(encoder, freeze)

    @classmethod
    def build(cls, encoder: XMoEEncoder, num_labels: int, **options: Any) -> "_EncoderWithHead":
        """The head `cls` on `encoder`; options are HeadConfig fields (freeze_experts=True, ...)."""
        return cls(encoder, HeadConfig(task=cls.task, num_labels=num_labels, **options))

    def run_encoder(
        self, src_tokens: torch.Tensor, src_langs: Optional[torch.Tensor], src_positions: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, list[MoEAux]]:
        features_BTC, extra = self.encoder(src_tokens, src_langs=src_langs, src_positions=src_positions, features_only=True)
        moe_aux = extra["moe_aux"]
        return features_BTC, mean_balance_loss(moe_aux, features_BTC), moe_aux

    def make_output(
        self, logits: torch.Tensor, task_loss: Optional[torch.Tensor], balance_loss: torch.Tensor, moe_aux: list[MoEAux]
    ) -> HeadOutput:
        loss = None if task_loss is None else with_balance_loss(task_loss, balance_loss, self.config.balance_loss_weight)
        return HeadOutput(logits, loss, task_loss, balance_loss, routing_stats(moe_aux))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ---- saving and loading next to an exported model ---------------------------------------
    def save(self, out_dir: str, exported_dir: str) -> None:
        """Write an exported folder with the fine-tuned encoder and this head (save_with_head)."""
        head_state = {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}
        save_with_head(out_dir, exported_dir, self.encoder, head_state, asdict(self.config))

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", **options: Any):
        """The head on an exported encoder (xmoe.hub.load). A folder written by `save` brings its
        head weights and head_config.json (options override the latter); otherwise the head is
        new and options must give num_labels."""
        from xmoe import hub

        hub_model = hub.load(path, device=device)
        values: dict[str, Any] = {}
        head_config_path = os.path.join(path, HEAD_CONFIG_FILE)
        if os.path.isfile(head_config_path):
            with open(head_config_path, encoding="utf-8") as f:
                values = json.load(f)
            if values.get("task") != cls.task:
                raise ValueError(f"{head_config_path} describes a {values.get('task')!r} head, not {cls.task!r}")
        values.update(options, task=cls.task)
        if "num_labels" not in values:
            raise ValueError(f"{path} has no {HEAD_CONFIG_FILE}: pass num_labels")
        model = cls(hub_model.encoder, HeadConfig(**values))
        if os.path.isfile(head_config_path):
            from safetensors.torch import load_file

            head_state = _upgrade_head_keys(load_file(os.path.join(path, HEAD_WEIGHTS_FILE)))
            missing, unexpected = model.load_state_dict(head_state, strict=False)
            head_missing = [k for k in missing if not k.startswith("encoder.")]
            if head_missing or unexpected:
                raise ValueError(f"{path}/{HEAD_WEIGHTS_FILE} does not fit the head: missing {head_missing}, unexpected {unexpected}")
        model.tokenizer = hub_model.tokenizer
        return model.to(device).eval()


class XMoEForSequenceClassification(_EncoderWithHead):
    """One label per sequence (or sentence pair): SequenceClassificationHead on the encoder."""

    task = "sequence_classification"

    def __init__(self, encoder: XMoEEncoder, config: HeadConfig):
        super().__init__(encoder, config)
        self.classifier = SequenceClassificationHead(
            encoder.cfg.encoder_embed_dim, config.num_labels, config.pooling, config.dropout
        )

    def forward(
        self,
        src_tokens: torch.Tensor,
        src_langs: Optional[torch.Tensor] = None,
        src_positions: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> HeadOutput:
        """labels: (B,) long class ids."""
        features_BTC, balance_loss, moe_aux = self.run_encoder(src_tokens, src_langs, src_positions)
        logits_BN = self.classifier(features_BTC, src_tokens.eq(self.encoder.padding_idx))
        task_loss = None if labels is None else F.cross_entropy(logits_BN.float(), labels)
        return self.make_output(logits_BN, task_loss, balance_loss, moe_aux)


class XMoEForTokenClassification(_EncoderWithHead):
    """One label per token (POS, NER): TokenClassificationHead on the encoder."""

    task = "token_classification"

    def __init__(self, encoder: XMoEEncoder, config: HeadConfig):
        super().__init__(encoder, config)
        self.classifier = TokenClassificationHead(encoder.cfg.encoder_embed_dim, config.num_labels, config.dropout)

    def forward(
        self,
        src_tokens: torch.Tensor,
        src_langs: Optional[torch.Tensor] = None,
        src_positions: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> HeadOutput:
        """labels: (B, T) long, IGNORE_INDEX (-100) where no label applies; padding is ignored
        whatever its label."""
        features_BTC, balance_loss, moe_aux = self.run_encoder(src_tokens, src_langs, src_positions)
        logits_BTN = self.classifier(features_BTC)
        task_loss = None
        if labels is not None:
            task_loss = token_classification_loss(logits_BTN, labels, src_tokens.eq(self.encoder.padding_idx))
        return self.make_output(logits_BTN, task_loss, balance_loss, moe_aux)
