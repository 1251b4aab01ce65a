"""MonolingualBlockDataset: whole lines packed behind <s>, never longer than the block."""

import fairseq  # noqa: F401  (import order: fairseq before xmoe)
import numpy as np
import torch
from fairseq.data import ListDataset

from xmoe.data.monolingual_blocks import MonolingualBlockDataset

BOS, PAD, EOS = 0, 1, 2


def lines(*bodies) -> ListDataset:
    items = [torch.tensor([*body, EOS]) for body in bodies]
    return ListDataset(items, sizes=np.array([len(x) for x in items]))


def test_blocks_hold_whole_lines_after_bos_with_language_and_positions():
    blocks = MonolingualBlockDataset(
        lines([10, 11], [12, 13, 14], [15], [16, 17, 18, 19]), lang_id=3,
        bos=BOS, pad=PAD, eos=EOS, max_tokens=9,
    )
    items = [blocks[i] for i in range(len(blocks))]
    # 8 slots after <s>: lines of 3 + 4 fit, adding 2 more would not
    assert [x["tokens"].tolist() for x in items] == [
        [BOS, 10, 11, EOS, 12, 13, 14, EOS],
        [BOS, 15, EOS, 16, 17, 18, 19, EOS],
    ]
    assert all(x["langs"].eq(3).all() for x in items)
    assert all(x["positions"].tolist() == list(range(len(x["tokens"]))) for x in items)
    assert blocks.sizes.tolist() == [8, 8]


def test_an_over_long_line_is_cut_to_the_block():
    blocks = MonolingualBlockDataset(
        lines(list(range(4, 60)), [5, 6]), lang_id=0, bos=BOS, pad=PAD, eos=EOS, max_tokens=16
    )
    assert [len(blocks[i]["tokens"]) for i in range(len(blocks))] == [16, 4]
    assert blocks[0]["tokens"].tolist() == [BOS] + list(range(4, 19))
    assert blocks.sizes.tolist() == [16, 4]
