"""The criterion's routing-fluctuation probe (--rf-probe-interval M)."""

from __future__ import annotations


import fairseq  # noqa: F401  (xmoe registers its fairseq components only once fairseq is loaded)
import pytest
import torch
from fairseq.logging import metrics

import xmoe.criterions  # noqa: F401
import xmoe.models  # noqa: F401
from xmoe.criterions.xmoe_masked_lm import XMoEMaskedLmConfig, XMoEMaskedLmLoss
from xmoe.models.xmoe_encoder import XMoEEncoderConfig, XMoEEncoderModel, apply_architecture

PROBE_EVERY = 2


@pytest.fixture
def model(task) -> XMoEEncoderModel:
    cfg = XMoEEncoderConfig()  # with dropout: the probe must switch it off
    apply_architecture(cfg, "xmoe_tiny")
    torch.manual_seed(0)
    return XMoEEncoderModel.build_model(cfg, task).train()


def sample(task, seed: int, batch: int = 4, length: int = 9) -> dict:
    pad = task.source_dictionary.pad()
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, len(task.source_dictionary), (batch, length), generator=generator)
    tokens[1, 6:] = pad
    target = torch.full_like(tokens, pad)
    target[:, 2] = tokens[:, 2]
    return {"net_input": {"src_tokens": tokens, "src_lengths": tokens.ne(pad).sum(1)}, "target": target,
            "ntokens": int(tokens.ne(pad).sum()), "nsentences": batch}


def criterion(task) -> XMoEMaskedLmLoss:
    return XMoEMaskedLmLoss(XMoEMaskedLmConfig(rf_probe_interval=PROBE_EVERY), task)


def train_forward(crit, model, update: int, batch: dict) -> dict:
    model.set_num_updates(update)
    _, _, logging_output = crit(model, batch)
    return {k: v for k, v in logging_output.items() if k.startswith("rf_")}


def test_probe_sets_its_reference_first_then_counts_every_m_updates(task, model):
    crit = criterion(task)
    first = sample(task, seed=1)
    assert train_forward(crit, model, 0, first) == {}  # reference only
    assert train_forward(crit, model, 1, sample(task, seed=2)) == {}  # not a multiple of M
    counts = train_forward(crit, model, 2, sample(task, seed=3))
    real_tokens = float(first["net_input"]["src_tokens"].ne(task.source_dictionary.pad()).sum())
    for layer in model.moe_layer_indices:  # the FIRST batch is re-routed, whatever the current one is
        assert counts[f"rf_tokens_moe{layer}"] == real_tokens
        assert counts[f"rf_changed_moe{layer}"] == 0.0  # nothing trained in between
    assert train_forward(crit, model, 2, sample(task, seed=4)) == {}  # once per update (update_freq > 1)


def test_probe_counts_tokens_whose_expert_changed(task, model):
    crit = criterion(task)
    first = sample(task, seed=1)
    train_forward(crit, model, 0, first)
    layer = model.moe_layer_indices[0]
    router = model.layers[layer].ffn.router
    with torch.no_grad():  # swap experts 0 and 1: tokens routed to either now go to the other
        router.expert_embeddings[[0, 1]] = router.expert_embeddings[[1, 0]].clone()
    model.eval()
    with torch.no_grad():
        _, extra = model(**first["net_input"], features_only=True)
    routed = extra["moe_aux"][0].routed_index
    expected = float(((routed == 0) | (routed == 1)).sum())
    model.train()
    counts = train_forward(crit, model, PROBE_EVERY, sample(task, seed=5))
    assert expected > 0
    assert counts[f"rf_changed_moe{layer}"] == expected


def test_probe_leaves_training_untouched(task, model):
    crit = criterion(task)
    batch = sample(task, seed=1)
    model.set_num_updates(0)
    rng_before = torch.get_rng_state()
    crit.rf_probe.maybe_probe(model, batch)
    assert torch.equal(torch.get_rng_state(), rng_before)  # eval mode: no dropout draws
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_reduce_metrics_pools_the_counts_of_all_workers():
    workers = [
        {"loss": 1.0, "sample_size": 1, "moe_batches": 1, "rf_changed_moe1": 3.0, "rf_tokens_moe1": 10.0},
        {"loss": 1.0, "sample_size": 1, "moe_batches": 1, "rf_changed_moe1": 1.0, "rf_tokens_moe1": 30.0},
    ]
    with metrics.aggregate() as aggregated:
        XMoEMaskedLmLoss.reduce_metrics(workers)
    values = aggregated.get_smoothed_values()
    assert values["moe1_rf"] == pytest.approx(0.1)
    assert not any(k.startswith("rf_") for k in values)
    with metrics.aggregate() as aggregated:
        XMoEMaskedLmLoss.reduce_metrics([{"loss": 1.0, "sample_size": 1, "moe_batches": 1}])
    assert "moe1_rf" not in aggregated.get_smoothed_values()  # no probe, no value


def test_probe_is_off_by_default(task):
    assert XMoEMaskedLmLoss(XMoEMaskedLmConfig(), task).rf_probe is None
