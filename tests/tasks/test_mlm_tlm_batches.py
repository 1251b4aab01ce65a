"""Training batches: alpha sampling, MLM/TLM interleaving, determinism and resume."""

import os

import numpy as np
import pytest
import torch
from fairseq.data.indexed_dataset import MMapIndexedDataset

LANGS = ["en", "de", "fr"]
PAIRS = ["en-de", "en-fr"]


def expected_shares(token_counts, alpha):
    shares = np.asarray(token_counts, dtype=float) / sum(token_counts)
    return shares**alpha / (shares**alpha).sum()


def corpus_tokens(path: str) -> int:
    lines = MMapIndexedDataset(path)  # keep it alive: its sizes are a view into its mmap
    return int(lines.sizes.sum())


def kinds(batches) -> str:
    return "".join(b["group"][0] for b in batches)  # "m" for mlm, "t" for tlm


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        x["group"] == y["group"]
        and torch.equal(x["id"], y["id"])
        and torch.equal(x["net_input"]["src_tokens"], y["net_input"]["src_tokens"])
        and torch.equal(x["target"], y["target"])
        for x, y in zip(a, b)
    )


@pytest.mark.parametrize("alpha", [0.3, 0.7])
def test_mlm_languages_are_drawn_in_proportion_to_token_share_to_the_alpha(
    data_dir, new_task, batches_of, alpha
):
    task = new_task(data_dir, tokens_per_sample=16, multilang_sampling_alpha=alpha)
    task.load_dataset("train")
    drawn = np.zeros(3)
    for batch in batches_of(task, "train", max_sentences=64):
        if batch["group"] == "mlm":
            drawn += np.bincount(batch["net_input"]["src_langs"][:, 0].numpy(), minlength=3)
    tokens = [corpus_tokens(os.path.join(data_dir, "mono", lang, "train")) for lang in LANGS]
    # batches repeat the MLM stream to keep 1:1, so compare shares, not counts
    assert drawn.sum() > 300
    assert drawn / drawn.sum() == pytest.approx(expected_shares(tokens, alpha), abs=0.02)


def test_tlm_pairs_are_drawn_in_proportion_to_token_share_to_the_alpha(data_dir, new_task):
    task = new_task(data_dir)
    task.load_dataset("train")
    dataset = task.dataset("train")
    tlm = dataset.groups[dataset.group_names.index("tlm")]
    tgt_lang = np.array([int(tlm[i]["langs"][-1]) for i in range(len(tlm))])
    drawn = np.array([(tgt_lang == 1).sum(), (tgt_lang == 2).sum()]) / len(tgt_lang)
    tokens = [
        sum(corpus_tokens(os.path.join(data_dir, "para", p, f"train.{lang}")) for lang in p.split("-"))
        for p in PAIRS
    ]
    assert len(tlm) == pytest.approx(300 + 80, abs=2)  # each pair rounds its count up
    assert drawn == pytest.approx(expected_shares(tokens, 0.3), abs=0.02)


@pytest.mark.parametrize("ratio, cycle", [("1:1", "mt"), ("3:1", "mmmt"), ("1:2", "mtt")])
def test_batch_iterator_interleaves_mlm_and_tlm_batches_at_the_ratio(
    data_dir, new_task, batches_of, ratio, cycle
):
    task = new_task(data_dir, tokens_per_sample=32, mlm_tlm_ratio=ratio)
    task.load_dataset("train")
    batches = batches_of(task, "train")
    sequence = kinds(batches)
    assert len(sequence) >= 10 * len(cycle)
    assert sequence == cycle * (len(sequence) // len(cycle))
    assert {b["group"] for b in batches} == {"mlm", "tlm"}


def test_every_worker_gets_the_ratio_and_the_same_kind_at_each_step(data_dir, new_task, batches_of):
    task = new_task(data_dir, tokens_per_sample=32, mlm_tlm_ratio="3:1")
    task.load_dataset("train")
    per_worker = [kinds(batches_of(task, "train", num_shards=2, shard_id=r)) for r in range(2)]
    assert per_worker[0] == per_worker[1]
    assert per_worker[0] == "mmmt" * (len(per_worker[0]) // 4)


def test_without_tlm_training_is_plain_multilingual_mlm(data_dir, tmp_path, binarize, new_task, batches_of):
    mlm_only = new_task(data_dir, mlm_tlm_ratio="1:0")
    no_pairs = new_task(binarize(str(tmp_path / "mono_only"), train_pairs={}))
    for task in (mlm_only, no_pairs):
        task.load_dataset("train")
        task.load_dataset("valid")
        assert set(kinds(batches_of(task, "train"))) == {"m"}
        assert {b["group"] for b in batches_of(task, "valid")} == set(LANGS)


def test_same_seed_and_epoch_give_identical_batches_and_the_next_epoch_redraws(
    data_dir, new_task, batches_of
):
    def epoch_batches(epoch: int, seed: int = 1):
        task = new_task(data_dir, tokens_per_sample=32, seed=seed)
        task.load_dataset("train", epoch=epoch)
        return batches_of(task, "train", epoch=epoch)

    first = epoch_batches(1)
    assert same_batches(first, epoch_batches(1))
    assert not same_batches(first, epoch_batches(2))
    assert not same_batches(first, epoch_batches(1, seed=2))


def test_one_iterator_redraws_each_epoch_like_a_fresh_one(data_dir, new_task, batches_of):
    task = new_task(data_dir, tokens_per_sample=32)
    task.load_dataset("train")
    iterator = task.get_batch_iterator(
        task.dataset("train"), max_tokens=2048, max_sentences=8, seed=1, epoch=1
    )
    epoch1 = list(iterator.next_epoch_itr(shuffle=True))
    epoch2 = list(iterator.next_epoch_itr(shuffle=True))
    assert not same_batches(epoch1, epoch2)
    fresh = new_task(data_dir, tokens_per_sample=32)
    fresh.load_dataset("train", epoch=2)
    assert same_batches(epoch2, batches_of(fresh, "train", epoch=2))


def test_resume_mid_epoch_continues_with_the_same_batches(data_dir, new_task):
    def iterator_for(task, epoch):
        return task.get_batch_iterator(
            task.dataset("train"), max_tokens=2048, max_sentences=8, seed=1, epoch=epoch,
            num_shards=2, shard_id=1,
        )

    task = new_task(data_dir, tokens_per_sample=32)
    task.load_dataset("train", epoch=2)
    iterator = iterator_for(task, epoch=2)
    epoch_itr = iterator.next_epoch_itr(shuffle=True)
    consumed = [next(epoch_itr) for _ in range(5)]
    state = iterator.state_dict()
    rest = list(epoch_itr)

    restarted = new_task(data_dir, tokens_per_sample=32)
    restarted.load_dataset("train", epoch=state["epoch"])
    resumed = iterator_for(restarted, epoch=state["epoch"])
    resumed.load_state_dict(state)
    assert len(consumed) == 5
    assert same_batches(rest, list(resumed.next_epoch_itr(shuffle=True)))


def test_a_language_with_pairs_only_joins_tlm_but_not_mlm(tmp_path, binarize, new_task, batches_of):
    data = binarize(
        str(tmp_path / "fr_pairs_only"), train_lines={"en": 200, "de": 100},
        valid_lines={"en": 20, "de": 10}, valid_pairs={"en-de": 12},
    )
    task = new_task(data)
    assert task.languages == ["en", "de"] and task.pairs == ["en-de", "en-fr"]
    task.load_dataset("train")
    task.load_dataset("valid")  # en-fr has no valid data: left out of validation
    train_langs = {"mlm": set(), "tlm": set()}
    for batch in batches_of(task, "train"):
        tokens = batch["net_input"]["src_tokens"]
        train_langs[batch["group"]] |= set(batch["net_input"]["src_langs"][tokens.ne(1)].tolist())
    assert train_langs == {"mlm": {0, 1}, "tlm": {0, 1, 2}}
    assert [b["group"] for b in batches_of(task, "valid", max_sentences=64)] == ["en", "de", "en-de"]
