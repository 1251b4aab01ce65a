"""Validation per language and per pair: separate batches, per-group loss and ppl."""

import math

import numpy as np
import pytest
import torch
from fairseq.logging import metrics

LANGS = ["en", "de", "fr"]
PAIRS = ["en-de", "en-fr"]
# a made-up per-token loss (nats) for every group, so each group's ppl is known
LOSS_PER_TOKEN = {"en": 1.0, "de": 2.0, "fr": 3.0, "en-de": 0.5, "en-fr": 1.5, "mlm": 2.5, "tlm": 0.7}


class OneWeightModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def set_num_updates(self, num_updates):
        pass


class ConstantLossCriterion(torch.nn.Module):
    """Loss = the group's per-token constant times the number of masked tokens; `extra`
    is added to "loss" only, like xmoe_masked_lm's balance term, while "mlm_loss" stays clean."""

    def __init__(self, pad: int, extra: float = 0.0):
        super().__init__()
        self.pad, self.extra = pad, extra

    def forward(self, model, sample):
        masked = float(sample["target"].ne(self.pad).sum())
        nll = LOSS_PER_TOKEN[sample["group"]] * masked * model.weight
        log = {"loss": float(nll.detach()) + self.extra, "sample_size": masked,
               "ntokens": sample["ntokens"], "nsentences": sample["nsentences"]}
        if self.extra:
            log["mlm_loss"] = float(nll.detach())
        return nll + self.extra, masked, log

    @staticmethod
    def reduce_metrics(logging_outputs):
        loss = sum(log["loss"] for log in logging_outputs)
        size = sum(log["sample_size"] for log in logging_outputs)
        metrics.log_scalar("loss", loss / size / math.log(2), size)

    @staticmethod
    def logging_outputs_can_be_summed():
        return True


def test_valid_batches_never_mix_groups_and_cover_every_sample_once(data_dir, new_task, batches_of):
    task = new_task(data_dir, tokens_per_sample=64)
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    assert dataset.group_names == LANGS + PAIRS
    group_sizes = np.diff(dataset.offsets)
    assert (group_sizes % 8 != 0).sum() >= 3  # most groups have a remainder to lose
    seen = {name: [] for name in dataset.group_names}
    # fairseq's default batch-size multiple (8) must not drop the small groups' remainders
    for batch in batches_of(task, "valid", max_sentences=16, required_batch_size_multiple=8):
        seen[batch["group"]] += batch["id"].tolist()
    for g, name in enumerate(dataset.group_names):
        expected = list(range(int(dataset.offsets[g]), int(dataset.offsets[g + 1])))
        assert sorted(seen[name]) == expected


@pytest.mark.parametrize("extra", [0.0, 100.0])
def test_valid_step_and_reduce_metrics_report_loss_and_ppl_per_language_and_pair(
    data_dir, new_task, batches_of, extra
):
    task = new_task(data_dir)
    task.load_dataset("valid")
    model, criterion = OneWeightModel(), ConstantLossCriterion(task.dictionary.pad(), extra)
    logs = [task.valid_step(b, model, criterion)[2] for b in batches_of(task, "valid")]
    # every logging output has the same keys: fairseq sums them across workers key by key
    assert all(log.keys() == logs[0].keys() for log in logs)
    with metrics.aggregate(new_root=True) as agg:
        task.reduce_metrics(logs, criterion)
        values = agg.get_smoothed_values()
    for name in LANGS + PAIRS:
        expected_loss = LOSS_PER_TOKEN[name] / math.log(2)
        assert values[f"loss_{name}"] == pytest.approx(expected_loss, abs=1e-3)
        assert values[f"ppl_{name}"] == pytest.approx(2**expected_loss, abs=0.01)
    assert "loss_mlm" not in values and "loss" in values  # the overall loss stays the criterion's


def test_train_step_reports_mlm_and_tlm_losses_separately(data_dir, new_task, batches_of):
    class BackwardOnly:
        def backward(self, loss):
            loss.backward()

    task = new_task(data_dir, tokens_per_sample=32)
    task.load_dataset("train")
    model, criterion = OneWeightModel(), ConstantLossCriterion(task.dictionary.pad())
    logs = [
        task.train_step(b, model, criterion, BackwardOnly(), update_num=0)[2]
        for b in batches_of(task, "train")[:6]
    ]
    with metrics.aggregate(new_root=True) as agg:
        task.reduce_metrics(logs, criterion)
        values = agg.get_smoothed_values()
    assert values["loss_mlm"] == pytest.approx(2.5 / math.log(2), abs=1e-3)
    assert values["loss_tlm"] == pytest.approx(0.7 / math.log(2), abs=1e-3)
    assert "loss_en" not in values
