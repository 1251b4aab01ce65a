"""What the task feeds the model: TLM and MLM sample layout, masking, length cap."""

import os

import numpy as np
import pytest
import torch
from fairseq.data.indexed_dataset import MMapIndexedDataset

EN, DE, FR = 0, 1, 2  # language ids = positions in the manifest's "languages"


def unmasked(batch: dict, pad: int) -> torch.Tensor:
    """(B, T) the tokens before masking: the target holds the original where masked."""
    target, source = batch["target"], batch["net_input"]["src_tokens"]
    return torch.where(target.ne(pad), target, source)


def test_tlm_sample_is_bos_src_eos_tgt_eos_with_restarting_positions_and_side_languages(
    data_dir, new_task, batches_of
):
    task = new_task(data_dir)
    task.load_dataset("valid")
    d = task.dictionary
    src_lines = MMapIndexedDataset(os.path.join(data_dir, "para", "en-de", "valid.en"))
    tgt_lines = MMapIndexedDataset(os.path.join(data_dir, "para", "en-de", "valid.de"))
    dataset = task.dataset("valid")
    first_en_de = int(dataset.offsets[dataset.group_names.index("en-de")])
    checked = 0
    for batch in batches_of(task, "valid"):
        if batch["group"] != "en-de":
            continue
        tokens = unmasked(batch, d.pad())
        net = batch["net_input"]
        for row, sample_id in enumerate(batch["id"].tolist()):
            src, tgt = src_lines[sample_id - first_en_de], tgt_lines[sample_id - first_en_de]
            n_src, n_tgt = len(src) + 1, len(tgt)  # "<s> src </s>" and "tgt </s>"
            length = int(net["src_lengths"][row])
            assert length == n_src + n_tgt
            expected = torch.cat([torch.tensor([d.bos()]), src, tgt])
            assert tokens[row, :length].tolist() == expected.tolist()
            assert net["src_positions"][row, :length].tolist() == (
                list(range(n_src)) + list(range(n_tgt))
            )
            assert net["src_langs"][row, :length].tolist() == [EN] * n_src + [DE] * n_tgt
            assert net["src_tokens"][row, length:].eq(d.pad()).all()
            checked += 1
    assert checked == len(src_lines)


def test_tlm_masks_both_sides_at_about_the_mask_rate(data_dir, new_task, batches_of):
    task = new_task(data_dir)
    task.load_dataset("train")
    pad = task.dictionary.pad()
    selected = {EN: 0, DE: 0, FR: 0}
    total = {EN: 0, DE: 0, FR: 0}
    for batch in batches_of(task, "train"):
        if batch["group"] != "tlm":
            continue
        langs = batch["net_input"]["src_langs"]
        tokens = batch["net_input"]["src_tokens"]
        real = tokens.ne(pad) & tokens.ne(task.dictionary.bos()) & tokens.ne(task.dictionary.eos())
        for lang in total:
            side = real & langs.eq(lang)
            total[lang] += int(side.sum())
            selected[lang] += int((batch["target"].ne(pad) & side).sum())
    # TLM pairs are en-de and en-fr: English is always the source side
    for lang in (EN, DE, FR):
        assert total[lang] > 500
        assert selected[lang] / total[lang] == pytest.approx(0.15, abs=0.03)


def test_masking_through_the_task_selects_15_percent_and_corrupts_80_10_10(
    data_dir, new_task, batches_of
):
    task = new_task(data_dir)
    task.load_dataset("train")
    d = task.dictionary
    specials = torch.tensor([d.bos(), d.pad(), d.eos(), d.unk()])
    counts = dict(maskable=0, selected=0, masked=0, unchanged=0)
    for batch in batches_of(task, "train"):
        source, target = batch["net_input"]["src_tokens"], batch["target"]
        original = unmasked(batch, d.pad())
        chosen = target.ne(d.pad())
        assert not (chosen & torch.isin(original, specials)).any()
        counts["maskable"] += int((~torch.isin(original, specials)).sum())
        counts["selected"] += int(chosen.sum())
        counts["masked"] += int(source[chosen].eq(task.mask_idx).sum())
        counts["unchanged"] += int(source[chosen].eq(original[chosen]).sum())
    assert counts["selected"] > 5000
    assert counts["selected"] / counts["maskable"] == pytest.approx(0.15, abs=0.01)
    assert counts["masked"] / counts["selected"] == pytest.approx(0.8, abs=0.02)
    # kept on purpose (10%) plus random replacements that drew the original (0.1 / 60)
    assert counts["unchanged"] / counts["selected"] == pytest.approx(0.1 + 0.1 / 60, abs=0.02)


def test_mlm_samples_are_bos_led_blocks_of_one_language_with_positions_from_0(
    data_dir, new_task, batches_of
):
    task = new_task(data_dir, tokens_per_sample=24)
    task.load_dataset("train")
    d = task.dictionary
    seen_langs = set()
    for batch in batches_of(task, "train"):
        if batch["group"] != "mlm":
            continue
        net = batch["net_input"]
        for row, length in enumerate(net["src_lengths"].tolist()):
            assert net["src_tokens"][row, 0] == d.bos()
            assert unmasked(batch, d.pad())[row, length - 1] == d.eos()  # whole lines
            langs = net["src_langs"][row, :length]
            assert langs.eq(langs[0]).all()
            assert net["src_positions"][row, :length].tolist() == list(range(length))
            seen_langs.add(int(langs[0]))
    assert seen_langs == {EN, DE, FR}


@pytest.mark.parametrize("split", ["train", "valid"])
def test_samples_never_exceed_tokens_per_sample_even_with_long_lines(
    long_data_dir, new_task, batches_of, split
):
    task = new_task(long_data_dir, tokens_per_sample=32)
    task.load_dataset(split)
    assert max(task.dataset(split).sizes) <= 32
    groups = set()
    for batch in batches_of(task, split, max_tokens=512):
        assert batch["net_input"]["src_tokens"].size(1) <= 32
        assert batch["net_input"]["src_positions"].max() < 32
        groups.add(batch["group"])
    assert {"en-de", "en-fr"} <= groups or {"mlm", "tlm"} == groups


def test_sample_fields_have_the_contract_shapes_and_types(data_dir, new_task, batches_of):
    task = new_task(data_dir)
    task.load_dataset("train")
    batch = batches_of(task, "train")[0]
    net = batch["net_input"]
    bsz, width = net["src_tokens"].shape
    for key in ("src_tokens", "src_langs", "src_positions"):
        assert net[key].shape == (bsz, width) and net[key].dtype == torch.long
    assert batch["target"].shape == (bsz, width)
    assert net["src_lengths"].shape == (bsz,)
    assert batch["nsentences"] == bsz == len(batch["id"])
    assert batch["ntokens"] == int(net["src_tokens"].ne(task.dictionary.pad()).sum())
    assert np.all(net["src_lengths"].numpy() == net["src_tokens"].ne(task.dictionary.pad()).sum(1).numpy())
