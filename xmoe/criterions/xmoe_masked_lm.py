"""Masked-LM loss plus the MoE layers' auxiliary losses, with per-layer routing statistics.

    loss = MLM cross-entropy (summed over masked tokens)
         + sample_size x (balance_loss_weight x mean_l balance_loss_l + sum_l z_loss_l)

fairseq divides the gradient by the total sample_size (masked tokens, over all workers and
accumulated batches), so the auxiliary terms are scaled by sample_size to enter the per-token
objective with exactly the weight balance_loss_weight (the paper's alpha, 0.01).

Works with any task whose samples carry "net_input" and a "target" that is padding everywhere
but at the masked positions: the xmoe_mlm_tlm task and fairseq's masked_lm.
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


@dataclass
class XMoEMaskedLmConfig(FairseqDataclass):
    balance_loss_weight: float = field(
        default=0.01,
        metadata={"help": "weight alpha of the mean (over MoE layers) load-balancing loss"},
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

    def forward(self, model, sample: dict[str, Any], reduce: bool = True):
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

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


# Resuming a run trained with this criterion must not depend on which plugin module loaded first.
allow_fairseq_checkpoint_globals()
