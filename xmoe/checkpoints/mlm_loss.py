"""What an upcycled model computes at update 0: its masked-LM loss on held-out data next to the
dense model's, on the very same masked batches.

With top-1 routing every expert's output is scaled by its gate value, so an upcycled model whose
experts are exact copies computes gate x FFN where the dense model computed FFN, and tokens past
an expert's capacity get no FFN output at all: it is not the dense function. With
--moe-renormalize-gates and no capacity limit it is (up to float rounding).

Batches come from the fairseq task the data was made for (this project's `xmoe_mlm_tlm` when
the folder has a manifest.json, fairseq's `masked_lm` otherwise, or the dense run's own task
settings when the checkpoint records them), so masking is exactly what validation during
training does. Losses are in bits per masked token, as fairseq logs them.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from xmoe.encoder import XMoEEncoder


@dataclass
class MlmLoss:
    loss: float  # bits per masked token
    masked_tokens: int
    top_gate_mean: Optional[float]  # mean gate value of the chosen expert over MoE layers
    dropped_fraction: Optional[float]  # tokens past capacity, mean over MoE layers


def build_task(data: str, task_cfg: Optional[dict[str, Any]], max_positions: int):
    """The fairseq task that batches `data`: the dense run's task settings when known (with data
    replaced), else xmoe_mlm_tlm for data-prep's layout and masked_lm for fairseq-preprocess's."""
    import xmoe.tasks  # noqa: F401  (registers xmoe_mlm_tlm)
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.tasks import TASK_DATACLASS_REGISTRY, TASK_REGISTRY
    from omegaconf import OmegaConf

    if not os.path.isdir(data):
        raise ValueError(f"--data {data!r} is not a folder")
    name = (task_cfg or {}).get("_name")
    if name not in TASK_REGISTRY:
        name = "xmoe_mlm_tlm" if os.path.isfile(os.path.join(data, "manifest.json")) else "masked_lm"
        task_cfg = {}
    # Task options like seed or train_subset point into the run's other groups (common.seed,
    # dataset.train_subset): resolve them against fairseq's defaults for a whole run.
    root = OmegaConf.structured(FairseqConfig())
    root.task = OmegaConf.structured(TASK_DATACLASS_REGISTRY[name]())
    cfg = OmegaConf.merge(
        OmegaConf.structured(TASK_DATACLASS_REGISTRY[name]()), OmegaConf.to_container(root.task, resolve=True)
    )
    known = {k: v for k, v in (task_cfg or {}).items() if k in cfg and k != "_name"}
    cfg = OmegaConf.merge(cfg, known)
    cfg.data = data
    if not known and "sample_break_mode" in cfg:
        cfg.sample_break_mode = "complete"  # fairseq's "none" splits sentences; "eos" fails under numpy 2
    if "tokens_per_sample" in cfg:
        cfg.tokens_per_sample = min(int(cfg.tokens_per_sample), max_positions)
    return TASK_REGISTRY[name].setup_task(cfg)


def _batches(task, split: str, batch_size: int):
    return task.get_batch_iterator(
        dataset=task.dataset(split), max_sentences=batch_size, ignore_invalid_inputs=True, seed=1, epoch=1,
        disable_iterator_cache=True,
    ).next_epoch_itr(shuffle=False)


def _add_batch(total: list, encoder: XMoEEncoder, sample: dict, pad: int) -> None:
    net_input, target_BT = sample["net_input"], sample["target"]
    masked_BT = target_BT.ne(pad)
    if not masked_BT.any():
        return
    encoder.eval()
    logits_MV, extra = encoder(
        net_input["src_tokens"],
        src_langs=net_input.get("src_langs"),
        src_positions=net_input.get("src_positions"),
        masked_tokens=masked_BT,
    )
    total[0] += float(F.cross_entropy(logits_MV.float(), target_BT[masked_BT], reduction="sum"))
    total[1] += int(masked_BT.sum())
    total[2] += [float(aux.stats["top_gate_mean"]) for aux in extra["moe_aux"]]
    total[3] += [float(aux.stats["dropped_fraction"]) for aux in extra["moe_aux"]]


def masked_lm_losses(
    encoders: dict[str, XMoEEncoder], task, split: str = "valid", max_sentences: int = 256, batch_size: int = 16
) -> dict[str, MlmLoss]:
    """{name: MlmLoss} of each encoder on the first `max_sentences` samples of `split`, every
    encoder on the same masked batches (eval mode, no dropout)."""
    task.load_dataset(split, combine=False, epoch=1)
    sums = {name: [0.0, 0, [], []] for name in encoders}  # loss nats, masked tokens, gates, dropped
    seen = 0
    with warnings.catch_warnings(), torch.no_grad():
        # fairseq asks its DataLoader for pinned memory, which torch warns about on CPU-only machines
        warnings.filterwarnings("ignore", message=".*pin_memory.*")
        for sample in _batches(task, split, batch_size):
            if seen >= max_sentences:
                break
            seen += int(sample["nsentences"])
            for name, encoder in encoders.items():
                _add_batch(sums[name], encoder, sample, task.source_dictionary.pad())
    if seen == 0 or not any(total[1] for total in sums.values()):
        raise ValueError(f"split {split!r} of the data gave no masked token to evaluate")
    return {
        name: MlmLoss(
            loss=nats / masked / math.log(2),
            masked_tokens=masked,
            top_gate_mean=sum(gates) / len(gates) if gates else None,
            dropped_fraction=sum(dropped) / len(dropped) if dropped else None,
        )
        for name, (nats, masked, gates, dropped) in sums.items()
    }
