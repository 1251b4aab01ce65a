"""fairseq model `xmoe_encoder`: options, architectures, and registration.

The network itself is `xmoe.encoder.XMoEEncoder` (plain torch: an XLM-R-style Transformer
encoder whose FFN is an xmoe.moe.MoELayer in chosen layers), so that export and `xmoe.hub`
run exactly the module trained here. This file maps fairseq's options onto it.

Inputs follow docs/CONTRACTS.md ("Model inputs"). The model also runs under fairseq's own
`masked_lm` task, whose net_input carries only src_tokens and src_lengths.

Architectures fill the size options (layers, dims, experts, where the MoE layers go) only where
the user left them unset, on the command line and in Hydra configs alike: those options default
to None, meaning "as the --arch says".
"""


import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model, register_model_architecture
from omegaconf import DictConfig
from torch import nn

from xmoe.encoder import EncoderConfig, XMoEEncoder
from xmoe.expert_checkpoint import keep_in_optimizer
from xmoe.moe import ACTIVATIONS, GATE_FNS, GATES, SECOND_EXPERT_POLICIES, MoELayer, expert_parallel_groups, freeze_moe

logger = logging.getLogger(__name__)

ACTIVATION_CHOICES = ChoiceEnum(sorted(ACTIVATIONS))


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
    lm_bias_init: ChoiceEnum(["zeros", "unigram"]) = field(  # type: ignore[valid-type]
        default="zeros",
        metadata={
            "help": "initial bias of the MLM output layer: 'zeros', or 'unigram' = log of each "
            "token's share in the dictionary's counts. With zeros, the tied token embeddings learn "
            "the unigram prior themselves: the softmax pushes every rarely-seen token's row the "
            "same way at each update, and Adam turns that small steady gradient into full-size "
            "steps, so rare pieces lose their identity (docs/results.md)"
        },
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
    moe_renormalize_gates: bool = field(
        default=False,
        metadata={
            "help": "divide each token's chosen gate values by their sum (a constant in the backward "
            "pass): the chosen experts' outputs are combined with weights summing to 1, so an upcycled "
            "model (identical experts) starts as the dense model for every token within capacity, and "
            "the router still learns from the task loss; off = outputs scaled by the gate values (the paper)"
        },
    )
    moe_expert_parallel: bool = field(
        default=False,
        metadata={
            "help": "shard experts over the distributed workers (all-to-all dispatch); needs "
            "experts divisible by the world size or vice versa"
        },
    )
    # --- frozen routing (the paper freezes router and experts at fine-tuning) ---
    moe_freeze_router_after: int = field(
        default=-1,
        metadata={
            "help": "freeze the routers of all MoE layers (token projection W, expert embeddings, "
            "temperature tau) from update K on: after K updates they never change again; the "
            "same on every worker and across resumes; -1 = never"
        },
    )
    moe_freeze_router: bool = field(
        default=False,
        metadata={"help": "never train the routers (fine-tuning with frozen routing); see --moe-freeze-experts"},
    )
    moe_freeze_experts: bool = field(
        default=False,
        metadata={
            "help": "never train the expert FFNs; with --moe-freeze-router this is the paper's "
            "fine-tuning setting (the balance loss stays on)"
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


def encoder_config(cfg: XMoEEncoderConfig, vocab_size: int, padding_idx: int) -> EncoderConfig:
    """The plain-torch network description of a (completed) fairseq model config."""
    return EncoderConfig(
        vocab_size=vocab_size,
        padding_idx=padding_idx,
        encoder_layers=cfg.encoder_layers,
        encoder_embed_dim=cfg.encoder_embed_dim,
        encoder_ffn_embed_dim=cfg.encoder_ffn_embed_dim,
        encoder_attention_heads=cfg.encoder_attention_heads,
        moe_layer_indices=moe_layer_indices(cfg),
        moe_experts=cfg.moe_experts or 0,
        max_positions=cfg.max_positions,
        num_languages=cfg.num_languages,
        scale_embedding=cfg.scale_embedding,
        no_layernorm_embedding=cfg.no_layernorm_embedding,
        encoder_normalize_before=cfg.encoder_normalize_before,
        activation_fn=str(cfg.activation_fn),
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        activation_dropout=cfg.activation_dropout,
        moe_gate=str(cfg.moe_gate),
        moe_top_k=cfg.moe_top_k,
        moe_routing_dim=cfg.moe_routing_dim,
        moe_gate_fn=str(cfg.moe_gate_fn),
        moe_normalize=not cfg.moe_no_normalize,
        moe_capacity_factor=cfg.moe_capacity_factor,
        moe_eval_capacity_factor=cfg.moe_eval_capacity_factor,
        moe_balance_temperature=cfg.moe_balance_temperature,
        moe_z_loss_weight=cfg.moe_z_loss_weight,
        moe_second_expert_policy=str(cfg.moe_second_expert_policy),
        moe_batch_prioritized=cfg.moe_batch_prioritized,
        moe_renormalize_gates=cfg.moe_renormalize_gates,
    )


def unigram_log_prior(counts: Sequence[int]) -> torch.Tensor:
    """(V,) log of each token's share of the counts, add-one smoothed (special symbols and
    <mask> have count ~0-1 and get a low prior, not -inf)."""
    counts_V = torch.tensor([max(int(c), 0) for c in counts], dtype=torch.float64) + 1.0
    return (counts_V / counts_V.sum()).log().float()


def refuse_tpu_mode_without_torch_xla(model_cfg: Any) -> None:
    """Stop with one line when fairseq is about to train on a TPU that is not there.

    fairseq-train's argparse options turn --bf16 and --memory-efficient-bf16 into --tpu as well,
    and its trainer then dies looking for torch_xla. fairseq-hydra-train (scripts/pretrain.sh)
    sets bf16 alone, which trains on GPUs and CPUs. The model config fairseq hands over hangs
    below the whole run's config, whose `common` group says whether TPU mode is on.
    """
    root = model_cfg._get_root() if isinstance(model_cfg, DictConfig) else None
    common = root.get("common") if root is not None else None
    if not common or not common.get("tpu", False) or importlib.util.find_spec("torch_xla") is not None:
        return
    raise SystemExit(
        "xmoe: fairseq's TPU mode is on (fairseq-train --bf16 and --memory-efficient-bf16 imply --tpu) "
        "but torch_xla is not installed; for bf16 on GPUs or CPUs use fairseq-hydra-train, e.g. "
        "scripts/pretrain.sh common.bf16=true common.memory_efficient_bf16=true, or fairseq-train "
        "--memory-efficient-fp16 / --amp"
    )


@register_model("xmoe_encoder", dataclass=XMoEEncoderConfig)
class XMoEEncoderModel(BaseFairseqModel):
    """XLM-R-style masked-LM encoder with sparse (X-MoE) FFNs in chosen layers."""

    def __init__(self, cfg: XMoEEncoderConfig, vocab_size: int, padding_idx: int):
        super().__init__()
        self.cfg = cfg
        self.padding_idx = padding_idx
        num_experts = cfg.moe_experts or 0
        ep_group, edp_group = (
            expert_parallel_groups(num_experts) if cfg.moe_expert_parallel and num_experts else (None, None)
        )
        # The network itself is plain torch (xmoe.encoder), shared with export and xmoe.hub.
        self.encoder = XMoEEncoder(encoder_config(cfg, vocab_size, padding_idx), ep_group, edp_group)
        self.num_updates = 0  # completed updates, as fairseq reports them (read by the criterion)
        # Frozen from the start: fairseq's optimizer never sees these parameters.
        freeze_moe(self, router=cfg.moe_freeze_router, experts=cfg.moe_freeze_experts)
        self.freeze_router_after = cfg.moe_freeze_router_after if cfg.moe_freeze_router_after >= 0 else None
        if self.freeze_router_after is not None:
            # Frozen mid-training: they stay in the optimizer (built before they froze), also
            # when a resumed run rebuilds it, so the saved optimizer state keeps lining up.
            keep_in_optimizer(p for p in self.router_parameters() if p.requires_grad)

    # Short-hands used by the criterion, the tests and the analysis tools.
    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layers

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    @property
    def lm_head(self) -> nn.Module:
        return self.encoder.lm_head

    @property
    def moe_layer_indices(self) -> list[int]:
        return self.encoder.moe_layer_indices

    @classmethod
    def build_model(cls, cfg: Any, task) -> "XMoEEncoderModel":
        # fairseq hands over a Namespace or a DictConfig that may lack options (a Hydra config
        # naming an --arch gets no dataclass defaults): complete it from the dataclass.
        refuse_tpu_mode_without_torch_xla(cfg)
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
        if cfg.lm_bias_init == "unigram":
            model.lm_head.bias.data.copy_(unigram_log_prior(dictionary.count))
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

    def router_parameters(self) -> list[nn.Parameter]:
        """Every MoE layer's router parameters (W, expert embeddings, tau), in layer order."""
        return [p for m in self.modules() if isinstance(m, MoELayer) for p in m.router.parameters()]

    def set_num_updates(self, num_updates: int) -> None:
        """fairseq calls this before every update with the number of completed updates (the same
        number on every worker) and once when it loads a checkpoint: frozen routing follows it."""
        super().set_num_updates(num_updates)
        self.num_updates = num_updates
        if self.freeze_router_after is not None and num_updates >= self.freeze_router_after:
            frozen = freeze_moe(self, router=True)
            if frozen:
                logger.info(
                    "update %d: froze %d router parameters of %d MoE layers (--moe-freeze-router-after %d)",
                    num_updates,
                    len(frozen),
                    len(self.moe_layer_indices),
                    self.freeze_router_after,
                )

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
        """See xmoe.encoder.XMoEEncoder.forward; src_lengths is implied by the padding."""
        return self.encoder(
            src_tokens,
            src_langs=src_langs,
            src_positions=src_positions,
            features_only=features_only,
            return_all_hiddens=return_all_hiddens,
            masked_tokens=masked_tokens,
        )

def _register_architecture(arch: str) -> None:
    def set_defaults(cfg: Any) -> None:
        apply_architecture(cfg, arch)

    set_defaults.__name__ = f"{arch}_architecture"
    register_model_architecture("xmoe_encoder", arch)(set_defaults)


for _arch in ARCHITECTURES:
    _register_architecture(_arch)
