"""The xmoe_masked_lm criterion: loss composition, logging outputs and reduced metrics."""

import math

import fairseq  # noqa: F401  (xmoe registers its fairseq components only once fairseq is loaded)
import pytest
import torch
import torch.nn.functional as F
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.logging import metrics

import xmoe.criterions  # noqa: F401
import xmoe.models  # noqa: F401
from xmoe.criterions.xmoe_masked_lm import XMoEMaskedLmConfig, XMoEMaskedLmLoss
from xmoe.models.xmoe_encoder import XMoEEncoderConfig, XMoEEncoderModel, apply_architecture


def build_model(task, arch="xmoe_tiny", **overrides) -> XMoEEncoderModel:
    cfg = XMoEEncoderConfig(dropout=0.0, attention_dropout=0.0, **overrides)
    apply_architecture(cfg, arch)
    torch.manual_seed(0)
    return XMoEEncoderModel.build_model(cfg, task).eval()  # eval: deterministic, comparable forwards


def masked_lm_sample(task, batch=4, length=9, extra_inputs=False) -> dict:
    """A batch shaped like fairseq's masked_lm task (or, with extra_inputs, like xmoe_mlm_tlm)."""
    pad = task.source_dictionary.pad()
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(4, len(task.source_dictionary), (batch, length), generator=generator)
    tokens[1, 6:] = pad
    masked = torch.rand(batch, length, generator=generator) < 0.3
    masked &= tokens.ne(pad)
    masked[0, 0] = True
    target = torch.where(masked, tokens, torch.full_like(tokens, pad))
    net_input = {"src_tokens": tokens, "src_lengths": tokens.ne(pad).sum(1)}
    if extra_inputs:
        net_input["src_langs"] = torch.tensor([0, 1, 0, 1]).unsqueeze(1).expand(batch, length)
        net_input["src_positions"] = torch.arange(length).expand(batch, length)
    return {"net_input": net_input, "target": target, "ntokens": int(tokens.ne(pad).sum()),
            "nsentences": batch, "id": torch.arange(batch)}


def make_criterion(task, weight=0.01) -> XMoEMaskedLmLoss:
    return XMoEMaskedLmLoss(XMoEMaskedLmConfig(balance_loss_weight=weight), task)


def test_criterion_is_registered_with_fairseq():
    assert CRITERION_REGISTRY["xmoe_masked_lm"] is XMoEMaskedLmLoss


def test_loss_is_mlm_plus_weighted_mean_balance_loss_plus_z_loss(task):
    model = build_model(task, moe_z_loss_weight=0.001)
    sample = masked_lm_sample(task)
    loss, sample_size, log = make_criterion(task, weight=0.01)(model, sample)

    masked = sample["target"].ne(task.source_dictionary.pad())
    logits, extra = model(**sample["net_input"], masked_tokens=masked)
    mlm = F.cross_entropy(logits, sample["target"][masked], reduction="sum")
    balance = torch.stack([a.balance_loss for a in extra["moe_aux"]]).mean()
    z = torch.stack([a.z_loss for a in extra["moe_aux"]]).sum()
    assert z > 0
    assert sample_size == int(masked.sum())
    torch.testing.assert_close(loss, mlm + sample_size * (0.01 * balance + z))
    torch.testing.assert_close(log["mlm_loss"], mlm.detach())
    torch.testing.assert_close(log["balance_loss"], balance.detach())


def test_balance_loss_weight_zero_leaves_only_the_mlm_loss(task):
    model = build_model(task)
    sample = masked_lm_sample(task)
    loss, _, log = make_criterion(task, weight=0.0)(model, sample)
    torch.testing.assert_close(loss, log["mlm_loss"])


def test_balance_loss_gradient_reaches_the_router(task):
    model = build_model(task).train()
    loss, _, _ = make_criterion(task)(model, masked_lm_sample(task))
    loss.backward()
    router = model.layers[1].ffn.router
    assert router.expert_embeddings.grad is not None and router.expert_embeddings.grad.abs().sum() > 0


def test_logging_output_has_routing_stats_per_moe_layer(task):
    model = build_model(task)
    _, _, log = make_criterion(task)(model, masked_lm_sample(task))
    for layer in (1, 3):  # xmoe_tiny's MoE layers
        assert 1.0 <= log[f"moe{layer}_load_max"] <= 4.0  # share x num_experts
        assert 0.0 <= log[f"moe{layer}_load_min"] <= 1.0
        assert 0.0 <= log[f"moe{layer}_dropped"] <= 1.0
        assert 0.0 <= log[f"moe{layer}_entropy"] <= math.log(4) + 1e-6
        assert log[f"moe{layer}_tau"] == pytest.approx(0.07)
    assert not any(k.startswith("moe0_") or k.startswith("moe2_") for k in log)


def test_gates_without_temperature_log_no_tau(task):
    model = build_model(task, moe_gate="switch")
    _, _, log = make_criterion(task)(model, masked_lm_sample(task))
    assert "moe1_load_max" in log and "moe1_tau" not in log


def test_reduce_metrics_logs_losses_ppl_and_routing_stats(task):
    model = build_model(task)
    criterion = make_criterion(task)
    logs = [criterion(model, masked_lm_sample(task))[2] for _ in range(2)]
    with metrics.aggregate(new_root=True) as agg:
        XMoEMaskedLmLoss.reduce_metrics(logs)
        values = agg.get_smoothed_values()
    sample_size = sum(log["sample_size"] for log in logs)
    assert values["mlm_loss"] == pytest.approx(
        float(sum(log["mlm_loss"] for log in logs)) / sample_size / math.log(2), abs=1e-3)
    assert values["ppl"] == pytest.approx(2 ** values["mlm_loss"], rel=1e-2)
    assert values["balance_loss"] == pytest.approx(float(logs[0]["balance_loss"]), abs=1e-3)
    for key in ("z_loss", "moe1_load_max", "moe1_load_min", "moe1_dropped", "moe1_entropy", "moe1_tau", "moe3_tau"):
        assert key in values, key
    assert XMoEMaskedLmLoss.logging_outputs_can_be_summed()


def test_dense_model_logs_zero_balance_loss_and_no_layer_stats(task):
    model = build_model(task, arch="dense_tiny")
    loss, _, log = make_criterion(task)(model, masked_lm_sample(task))
    assert float(log["balance_loss"]) == 0.0
    torch.testing.assert_close(loss, log["mlm_loss"])
    assert not any(k[3:4].isdigit() for k in log if k.startswith("moe"))


def test_accepts_samples_of_the_cross_lingual_task(task):
    model = build_model(task, num_languages=2)
    loss, sample_size, log = make_criterion(task)(model, masked_lm_sample(task, extra_inputs=True))
    assert torch.isfinite(loss) and sample_size > 0 and "moe1_load_max" in log


def test_batch_without_masked_tokens_still_runs_the_model(task):
    # Every worker must run the MoE layers (and their all-to-alls) even on such a batch.
    model = build_model(task)
    sample = masked_lm_sample(task)
    sample["target"].fill_(task.source_dictionary.pad())
    loss, sample_size, log = make_criterion(task)(model, sample)
    assert sample_size == 0 and float(log["mlm_loss"]) == 0.0
    assert torch.isfinite(loss) and "moe1_load_max" in log
