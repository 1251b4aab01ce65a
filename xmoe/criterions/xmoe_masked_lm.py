"""Masked-LM loss plus the MoE layers' auxiliary losses, with per-layer routing statistics.

    loss = MLM cross-entropy (summed over masked tokens)
         + sample_size x (balance_loss_weight x mean_l balance_loss_l + sum_l z_loss_l)

fairseq divides the gradient by the total sample_size (masked tokens, over all workers and
accumulated batches), so the auxiliary terms are scaled by sample_size to enter the per-token
objective with exactly the weight balance_loss_weight (the paper's alpha, 0.01).

Works with any task whose samples carry "net_input" and a "target" that is padding everywhere
but at the masked positions: the xmoe_mlm_tlm task and fairseq's masked_lm.

Routing fluctuation during training (--rf-probe-interval M): the first training batch a worker
sees becomes its probe batch. Before every update whose number of completed updates is a
multiple of M, every worker routes its probe batch again (eval mode, no gradients) and logs, per
MoE layer, `moe{i}_rf`: the fraction of the probe's tokens whose top-1 expert (the router's
choice before capacity) differs from the previous probe's, pooled over workers. All workers probe
at the same update, so the expert-parallel all-to-alls of the probe match up. The probe batch
is not saved in checkpoints (every worker holds its own, and a resume may change the number of
workers): a resumed run takes its first batch as a new probe batch, and its first probe only
sets the reference, so the series continues one interval later. In the progress log `moe{i}_rf`
is null for log intervals without a probe.
"""


import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics

from xmoe.checkpoint import allow_fairseq_checkpoint_globals
from xmoe.moe import MoEAux

# Routing statistics logged per MoE layer: key suffix -> what it measures.
ROUTING_STATS = {
    "load_max": "largest expert's share of the tokens x num_experts (1 = perfectly balanced)",
    "load_min": "smallest expert's share of the tokens x num_experts (0 = an idle expert)",
    "dropped": "fraction of tokens over capacity (they skip the FFN)",
    "entropy": "mean entropy of the router's distribution over experts (nats)",
    "tau": "gate temperature (only routers that have one)",
}

LAYER_STAT_KEY = re.compile(r"^moe\d+_")  # e.g. "moe3_load_max": layer 3 (0-based)
# Routing-fluctuation counts in logging outputs (summed over workers, then divided).
RF_CHANGED_KEY = re.compile(r"^rf_changed_moe(\d+)$")


@dataclass
class XMoEMaskedLmConfig(FairseqDataclass):
    balance_loss_weight: float = field(
        default=0.01,
        metadata={"help": "weight alpha of the mean (over MoE layers) load-balancing loss"},
    )
    rf_probe_interval: int = field(
        default=0,
        metadata={
            "help": "every M updates, route a fixed probe batch (each worker's first training "
            "batch) again and log per MoE layer moe{i}_rf, the fraction of its tokens whose expert "
            "changed since the previous probe; 0 = off"
        },
    )


def routing_stats(aux: MoEAux) -> dict[str, float]:
    """The ROUTING_STATS of one MoE layer's forward, as floats (tau only when the gate has one)."""
    stats = aux.stats
    fraction_E = stats["expert_fraction"].detach().float()
    num_experts = fraction_E.numel()
    values = {
        "load_max": float(fraction_E.max()) * num_experts,
        "load_min": float(fraction_E.min()) * num_experts,
        "dropped": float(stats["dropped_fraction"]),
        "entropy": float(stats["gate_entropy"]),
    }
    tau = float(stats.get("tau", math.nan))
    # The key set must be the same on every worker (fairseq sums logging outputs key by key);
    # it is, since whether tau exists depends on the gate type only.
    if math.isfinite(tau):
        values["tau"] = tau
    return values


@register_criterion("xmoe_masked_lm", dataclass=XMoEMaskedLmConfig)
class XMoEMaskedLmLoss(FairseqCriterion):
    """MLM cross-entropy + weighted balance loss (+ z-loss) of the model's MoE layers."""

    def __init__(self, cfg: XMoEMaskedLmConfig, task):
        super().__init__(task)
        self.balance_loss_weight = cfg.balance_loss_weight
        self.rf_probe = RoutingFluctuationProbe(cfg.rf_probe_interval) if cfg.rf_probe_interval > 0 else None

    def forward(self, model, sample: dict[str, Any], reduce: bool = True):
        rf_counts = self.rf_probe.maybe_probe(model, sample) if self.rf_probe and model.training else {}
        masked_tokens_BT = sample["target"].ne(self.padding_idx)
        sample_size = int(masked_tokens_BT.sum())
        # A batch without any masked token still runs the whole model (every worker must
        # take part in the MoE all-to-alls); it projects all tokens and its MLM loss is 0.
        select = masked_tokens_BT if sample_size > 0 else None

        logits, extra = model(**sample["net_input"], masked_tokens=select)
        targets = sample["target"][select] if select is not None else sample["target"]
        mlm_loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)).float(),
            targets.view(-1),
            reduction="sum",
            ignore_index=self.padding_idx,
        )

        moe_aux: list[MoEAux] = extra.get("moe_aux", []) if isinstance(extra, dict) else []
        zero = mlm_loss.new_zeros(())
        balance_loss = torch.stack([a.balance_loss for a in moe_aux]).mean() if moe_aux else zero
        z_loss = torch.stack([a.z_loss for a in moe_aux]).sum() if moe_aux else zero
        loss = mlm_loss + sample_size * (self.balance_loss_weight * balance_loss + z_loss)

        logging_output: dict[str, Any] = {
            "loss": loss.data,
            "mlm_loss": mlm_loss.data,
            "balance_loss": balance_loss.data,
            "z_loss": z_loss.data,
            "moe_batches": 1,  # denominators of the per-batch averages below
            "ntokens": sample["ntokens"],
            "nsentences": sample["nsentences"],
            "sample_size": sample_size,
        }
        for layer_index, aux in zip(getattr(model, "moe_layer_indices", range(len(moe_aux))), moe_aux):
            for name, value in routing_stats(aux).items():
                logging_output[f"moe{layer_index}_{name}"] = value
        logging_output.update(rf_counts)
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs: list[dict[str, Any]]) -> None:
        def total(key: str) -> float:
            return float(sum(log.get(key, 0) for log in logging_outputs))

        sample_size = total("sample_size")
        batches = total("moe_batches")
        # fairseq reports losses in bits per token (base 2); ppl = 2 ** mlm_loss.
        if sample_size > 0:
            metrics.log_scalar("loss", total("loss") / sample_size / math.log(2), sample_size, round=3)
            metrics.log_scalar("mlm_loss", total("mlm_loss") / sample_size / math.log(2), sample_size, round=3)
            metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["mlm_loss"].avg))
        if batches > 0:
            metrics.log_scalar("balance_loss", total("balance_loss") / batches, batches, round=4)
            metrics.log_scalar("z_loss", total("z_loss") / batches, batches, round=4)
            layer_keys = sorted({k for log in logging_outputs for k in log if LAYER_STAT_KEY.match(k)})
            for key in layer_keys:
                metrics.log_scalar(key, total(key) / batches, batches, round=3)
        for layer in sorted({int(m.group(1)) for log in logging_outputs for k in log if (m := RF_CHANGED_KEY.match(k))}):
            tokens = total(f"rf_tokens_moe{layer}")
            if tokens > 0:
                metrics.log_scalar(f"moe{layer}_rf", total(f"rf_changed_moe{layer}") / tokens, tokens, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


class RoutingFluctuationProbe:
    """Re-routes a fixed probe batch every `interval` updates and counts changed experts per layer."""

    def __init__(self, interval: int):
        self.interval = interval
        self.probe_input: dict[str, Any] | None = None  # net_input of the first training batch
        self.previous_routing: dict[int, torch.Tensor] = {}  # layer -> (B, T) top-1 experts, -1 = padding
        self.last_probed_update: int | None = None

    def maybe_probe(self, model, sample: dict[str, Any]) -> dict[str, float]:
        """Called at every training forward; probes at the first forward of every M-th update.
        Returns the logging-output entries rf_changed_moe{i} / rf_tokens_moe{i} (empty when this
        forward does not probe, or when the probe only sets the reference)."""
        num_updates = getattr(model, "num_updates", None)
        if num_updates is None:
            raise ValueError("--rf-probe-interval needs a model that tracks num_updates (xmoe_encoder)")
        if self.probe_input is None:
            self.probe_input = {k: v.detach().clone() for k, v in sample["net_input"].items() if torch.is_tensor(v)}
        if num_updates % self.interval or num_updates == self.last_probed_update:
            return {}
        self.last_probed_update = num_updates
        routing = self.route_probe(model)
        counts: dict[str, float] = {}
        for layer, experts_BT in routing.items():
            before_BT = self.previous_routing.get(layer)
            if before_BT is not None and before_BT.shape == experts_BT.shape:
                tokens_BT = before_BT.ge(0)
                counts[f"rf_changed_moe{layer}"] = float((experts_BT.ne(before_BT) & tokens_BT).sum())
                counts[f"rf_tokens_moe{layer}"] = float(tokens_BT.sum())
        self.previous_routing = routing
        return counts

    @torch.no_grad()
    def route_probe(self, model) -> dict[int, torch.Tensor]:
        """{layer index: (B, T) top-1 expert before capacity} of the probe batch, in eval mode
        (no dropout: the probe draws no random numbers, so training is unchanged by it)."""
        model.eval()
        try:
            _, extra = model(**self.probe_input, features_only=True)
        finally:
            model.train()
        moe_aux: list[MoEAux] = extra.get("moe_aux", []) if isinstance(extra, dict) else []
        layers = getattr(model, "moe_layer_indices", range(len(moe_aux)))
        return {layer: aux.routed_index.detach().clone() for layer, aux in zip(layers, moe_aux)}


# Resuming a run trained with this criterion must not depend on which plugin module loaded first.
allow_fairseq_checkpoint_globals()
