"""TLM samples: one aligned sentence pair as `<s> src </s> tgt </s>`.

Shape letters: T = tokens in one sample (<= max_tokens), N = pairs.
"""

from typing import Dict, Tuple

import numpy as np
import torch
from fairseq.data import FairseqDataset

from xmoe.data.sized import SizedDataset

# tokens a pair adds around its two sentences: <s> ... </s> ... </s>
PAIR_FRAME_TOKENS = 3


def fit_pair_lengths(
    src_len: np.ndarray, tgt_len: np.ndarray, budget: int
) -> Tuple[np.ndarray, np.ndarray]:
    """How many tokens of each side to keep so that both together fit in `budget`.

    A side shorter than half the budget is kept whole and the other side gets the
    rest; when both are long each keeps (about) half. Works elementwise on arrays.
    """
    keep_src = np.minimum(src_len, np.maximum(budget // 2, budget - tgt_len))
    keep_tgt = np.minimum(tgt_len, budget - keep_src)
    return keep_src, keep_tgt


class ParallelPairDataset(SizedDataset):
    """Joins line i of `src` and line i of `tgt` into one TLM sample.

    Items of `src`/`tgt` are dictionary ids followed by </s> (the binarized layout).
    Output per item: tokens `<s> src </s> tgt </s>`; langs = src_lang_id on
    `<s> src </s>` and tgt_lang_id on `tgt </s>`; positions count from 0 on each
    side, so the target segment restarts at 0. Sides are cut (keeping their </s>)
    so that the sample never exceeds `max_tokens`.
    """

    def __init__(
        self,
        src: FairseqDataset,
        tgt: FairseqDataset,
        src_lang_id: int,
        tgt_lang_id: int,
        bos: int,
        eos: int,
        max_tokens: int,
    ):
        super().__init__()
        if len(src) != len(tgt):
            raise ValueError(
                f"parallel sides differ in length: {len(src)} source vs {len(tgt)} target lines"
            )
        if max_tokens <= PAIR_FRAME_TOKENS:
            raise ValueError(f"max_tokens must exceed {PAIR_FRAME_TOKENS}, got {max_tokens}")
        self.src, self.tgt = src, tgt
        self.src_lang_id, self.tgt_lang_id = src_lang_id, tgt_lang_id
        self.bos, self.eos = bos, eos
        self.budget = max_tokens - PAIR_FRAME_TOKENS
        # sentence bodies exclude the trailing </s> each binarized line carries
        src_body = np.maximum(np.asarray(src.sizes, dtype=np.int64) - 1, 0)  # (N,)
        tgt_body = np.maximum(np.asarray(tgt.sizes, dtype=np.int64) - 1, 0)  # (N,)
        keep_src, keep_tgt = fit_pair_lengths(src_body, tgt_body, self.budget)
        self._sizes = keep_src + keep_tgt + PAIR_FRAME_TOKENS  # (N,)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        src_body = self.src[index][:-1].long()
        tgt_body = self.tgt[index][:-1].long()
        keep_src, keep_tgt = fit_pair_lengths(
            np.int64(len(src_body)), np.int64(len(tgt_body)), self.budget
        )
        bos = src_body.new_full((1,), self.bos)
        eos = src_body.new_full((1,), self.eos)
        src_side = torch.cat([bos, src_body[: int(keep_src)], eos])  # (Ts,)
        tgt_side = torch.cat([tgt_body[: int(keep_tgt)], eos])  # (Tt,)
        return {
            "tokens": torch.cat([src_side, tgt_side]),  # (T,)
            "langs": torch.cat(
                [
                    torch.full_like(src_side, self.src_lang_id),
                    torch.full_like(tgt_side, self.tgt_lang_id),
                ]
            ),
            "positions": torch.cat([torch.arange(len(src_side)), torch.arange(len(tgt_side))]),
        }
