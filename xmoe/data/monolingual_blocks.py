"""Monolingual MLM samples: blocks of whole lines of one language, led by <s>.

Shape letters: T = tokens in one sample (<= tokens_per_sample).
"""

from typing import Dict

import numpy as np
import torch
from fairseq.data import FairseqDataset, TokenBlockDataset, TruncateDataset

from xmoe.data.sized import SizedDataset


class MonolingualBlockDataset(SizedDataset):
    """Packs consecutive lines into blocks of at most `max_tokens` tokens.

    Each item is `<s> line_i </s> line_i+1 </s> ...` with every token tagged with
    `lang_id` and positions 0..T-1. Lines are never split across blocks; a line
    longer than the block on its own is cut to fit (it then loses its </s>).
    """

    def __init__(
        self, lines: FairseqDataset, lang_id: int, bos: int, pad: int, eos: int, max_tokens: int
    ):
        super().__init__()
        block_size = max_tokens - 1  # one slot is reserved for the leading <s>
        # NOTE: TokenBlockDataset's "complete" mode lets a single over-long line form an
        # over-long block, so lines are truncated before packing.
        lines = TruncateDataset(lines, block_size)
        self.blocks = TokenBlockDataset(
            lines, lines.sizes, block_size, pad=pad, eos=eos, break_mode="complete"
        )
        self.lang_id = lang_id
        self.bos = bos
        self._sizes = self.blocks.sizes.astype(np.int64) + 1

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        block = self.blocks[index]
        tokens = torch.cat([block.new_full((1,), self.bos), block]).long()  # (T,)
        return {
            "tokens": tokens,
            "langs": torch.full_like(tokens, self.lang_id),  # (T,)
            "positions": torch.arange(len(tokens), dtype=torch.long),  # (T,)
        }
