"""alpha re-balancing: q_l ~ p_l^alpha, redrawn every epoch, reproducible under the seed."""

import fairseq  # noqa: F401  (import order: fairseq before xmoe)
import numpy as np
import pytest
import torch
from fairseq.data import ListDataset

from xmoe.data.sampling import alpha_sampling_probs, resample_by_alpha


def corpus(num_items: int, item_len: int, tag: int) -> ListDataset:
    """`num_items` items of `item_len` tokens, every token equal to `tag`."""
    items = [torch.full((item_len,), tag) for _ in range(num_items)]
    return ListDataset(items, sizes=np.full(num_items, item_len))


def test_alpha_probabilities_follow_token_share_to_the_power_alpha():
    counts = [9000.0, 900.0, 100.0]
    shares = np.array(counts) / sum(counts)
    expected = shares**0.3 / (shares**0.3).sum()
    assert alpha_sampling_probs(counts, 0.3) == pytest.approx(expected)
    assert alpha_sampling_probs(counts, 1.0) == pytest.approx(shares)
    assert alpha_sampling_probs(counts, 0.0) == pytest.approx([1 / 3] * 3)


def test_resampled_corpora_match_p_to_the_alpha_on_a_large_draw():
    # token shares differ from item shares: the third corpus has longer items
    corpora = [corpus(20000, 10, 0), corpus(3000, 10, 1), corpus(500, 40, 2)]
    tokens = [20000 * 10, 3000 * 10, 500 * 40]
    mixed = resample_by_alpha(corpora, alpha=0.3, seed=1)
    tags = np.array([int(mixed[i][0]) for i in range(len(mixed))])
    observed = np.bincount(tags, minlength=3) / len(tags)
    shares = np.array(tokens) / sum(tokens)
    expected = shares**0.3 / (shares**0.3).sum()
    assert observed == pytest.approx(expected, abs=0.01)
    assert len(mixed) == pytest.approx(23500, abs=3)  # the epoch keeps the natural item count


def test_resampling_is_reproducible_and_redrawn_each_epoch():
    def drawn(seed: int, epoch: int) -> list:
        corpora = [
            ListDataset([torch.tensor([i]) for i in range(500)], sizes=np.ones(500)),
            ListDataset([torch.tensor([1000 + i]) for i in range(50)], sizes=np.ones(50)),
        ]
        mixed = resample_by_alpha(corpora, alpha=0.5, seed=seed)
        mixed.set_epoch(epoch)
        return [int(mixed[i][0]) for i in range(len(mixed))]

    assert drawn(seed=1, epoch=1) == drawn(seed=1, epoch=1)
    assert drawn(seed=1, epoch=1) != drawn(seed=1, epoch=2)
    assert drawn(seed=1, epoch=1) != drawn(seed=2, epoch=1)


def test_invalid_token_counts_are_rejected():
    with pytest.raises(ValueError, match="positives"):
        alpha_sampling_probs([10.0, 0.0], 0.3)
