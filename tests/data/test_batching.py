"""Batch order helpers: batching by size and interleaving streams at a ratio."""

import fairseq  # noqa: F401  (import order: fairseq before xmoe)
import numpy as np
import pytest

from xmoe.data.batching import batches_by_size, interleave_streams


def tagged_stream(tag: str, batches_per_pass: int):
    """pass p -> batches labelled (tag, p, i), as lists so that equality is easy to check."""
    return lambda p: [(tag, p, i) for i in range(batches_per_pass)]


def test_one_to_one_alternates_and_lasts_until_the_longer_stream_is_used_once():
    order = interleave_streams([tagged_stream("m", 5), tagged_stream("t", 2)], [1, 1])
    assert [b[0] for b in order] == ["m", "t"] * 5
    assert [b for b in order if b[0] == "m"] == [("m", 0, i) for i in range(5)]
    # the short stream continues with fresh passes instead of stopping the epoch
    assert [b[1:] for b in order if b[0] == "t"] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]


def test_three_to_one_gives_three_mlm_batches_per_tlm_batch():
    order = interleave_streams([tagged_stream("m", 12), tagged_stream("t", 10)], [3, 1])
    kinds = "".join(b[0] for b in order)
    assert kinds == "mmmt" * 10
    assert kinds.count("m") == 3 * kinds.count("t")


def test_slots_give_every_worker_the_same_stream_at_each_step():
    order = interleave_streams([tagged_stream("m", 8), tagged_stream("t", 8)], [1, 1], slot_size=2)
    kinds = [b[0] for b in order]
    assert kinds == ["m", "m", "t", "t"] * 4
    # fairseq hands batch i to worker i % 2: both workers alternate m, t
    assert kinds[0::2] == kinds[1::2] == ["m", "t"] * 4


def test_a_zero_ratio_leaves_that_stream_out():
    order = interleave_streams([tagged_stream("m", 3), tagged_stream("t", 3)], [1, 0])
    assert [b[0] for b in order] == ["m"] * 3


def test_an_empty_stream_with_a_positive_ratio_is_an_error():
    with pytest.raises(ValueError, match="no batches"):
        interleave_streams([tagged_stream("m", 3), tagged_stream("t", 0)], [1, 1])


def test_batches_by_size_covers_every_item_once_within_the_token_budget():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 50, size=500)
    batches = batches_by_size(sizes, np.random.default_rng(1), max_tokens=200, max_sentences=16)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(500))
    assert all(len(b) <= 16 and len(b) * sizes[b].max() <= 200 for b in batches)
    again = batches_by_size(sizes, np.random.default_rng(1), max_tokens=200, max_sentences=16)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))


def test_batches_by_size_keeps_the_last_batch_that_is_not_a_multiple():
    sizes = np.full(21, 10)  # batches of 8, 8, then 5 items, which fairseq's batch_by_size drops
    batches = batches_by_size(sizes, np.random.default_rng(0), max_tokens=None, max_sentences=8,
                              required_batch_size_multiple=8)
    assert sorted(len(b) for b in batches) == [5, 8, 8]
    assert sorted(np.concatenate(batches).tolist()) == list(range(21))


def test_a_stream_whose_first_pass_was_trained_on_tops_up_from_later_passes():
    # a resumed epoch: "t" has no batch left in pass 0, "m" still has 3
    t_passes = lambda p: [] if p == 0 else [("t", p, i) for i in range(2)]  # noqa: E731
    order = interleave_streams([tagged_stream("m", 3), t_passes], [1, 1])
    assert [b[0] for b in order] == ["m", "t"] * 3
    assert [b[1:] for b in order if b[0] == "t"] == [(1, 0), (1, 1), (2, 0)]
    assert interleave_streams([lambda p: [] if p == 0 else ["m"], t_passes], [1, 1]) == []
