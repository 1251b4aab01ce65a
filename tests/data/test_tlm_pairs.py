"""ParallelPairDataset: `<s> src </s> tgt </s>`, per-side languages and positions, length cap."""

import fairseq  # noqa: F401  (import order: fairseq before xmoe)
import numpy as np
import torch
from fairseq.data import ListDataset

from xmoe.data.parallel_pairs import ParallelPairDataset, fit_pair_lengths

BOS, EOS = 0, 2


def lines(*bodies) -> ListDataset:
    """Binarized-style lines: the ids followed by </s>."""
    items = [torch.tensor([*body, EOS]) for body in bodies]
    return ListDataset(items, sizes=np.array([len(x) for x in items]))


def test_pair_sample_is_bos_src_eos_tgt_eos_with_restarting_positions_and_side_languages():
    pairs = ParallelPairDataset(
        lines([10, 11, 12]), lines([20, 21]), src_lang_id=4, tgt_lang_id=7,
        bos=BOS, eos=EOS, max_tokens=32,
    )
    item = pairs[0]
    assert item["tokens"].tolist() == [BOS, 10, 11, 12, EOS, 20, 21, EOS]
    assert item["positions"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert item["langs"].tolist() == [4, 4, 4, 4, 4, 7, 7, 7]
    assert pairs.sizes.tolist() == [8]


def test_long_pairs_are_cut_to_max_tokens_keeping_both_separators():
    rng = np.random.default_rng(0)
    src_bodies = [list(rng.integers(4, 50, size=n)) for n in rng.integers(0, 200, size=300)]
    tgt_bodies = [list(rng.integers(4, 50, size=n)) for n in rng.integers(0, 200, size=300)]
    max_tokens = 40
    pairs = ParallelPairDataset(
        lines(*src_bodies), lines(*tgt_bodies), 0, 1, bos=BOS, eos=EOS, max_tokens=max_tokens
    )
    for i in range(len(pairs)):
        tokens = pairs[i]["tokens"]
        assert len(tokens) <= max_tokens
        assert len(tokens) == pairs.sizes[i] == pairs.num_tokens(i)
        assert tokens[0] == BOS and tokens[-1] == EOS and int((tokens == EOS).sum()) == 2
        src_len = int((tokens == EOS).nonzero()[0]) - 1
        tgt_len = len(tokens) - src_len - 3
        # a side is cut only when the pair does not fit, and never below half the budget
        # unless it was shorter than that
        budget = max_tokens - 3
        if len(src_bodies[i]) + len(tgt_bodies[i]) > budget:
            assert src_len + tgt_len == budget
            assert src_len >= min(len(src_bodies[i]), budget // 2)
            assert tgt_len >= min(len(tgt_bodies[i]), budget - budget // 2)
        assert tokens[1 : 1 + src_len].tolist() == src_bodies[i][:src_len]


def test_fit_pair_lengths_keeps_the_short_side_whole():
    keep_src, keep_tgt = fit_pair_lengths(np.array([100, 5, 100, 3]), np.array([5, 100, 100, 4]), 50)
    assert keep_src.tolist() == [45, 5, 25, 3]
    assert keep_tgt.tolist() == [5, 45, 25, 4]
