"""BERT-style token masking for MLM and TLM samples.

Shape letters: T = tokens in one sample, V = dictionary size.

A `TokenMasker` is a plain callable: it takes one sample's token ids and a numpy
random generator and returns (masked input, target). Randomness comes only from
the generator, so the caller decides what makes a mask reproducible (the task
seeds it with seed, epoch and sample index).
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

# sentencepiece marks the first piece of every word with this character
SPM_WORD_START = "\u2581"


def word_start_table(symbols: Sequence[str], num_special: int) -> np.ndarray:
    """(V,) bool: True where a dictionary entry begins a word.

    Pieces starting with "▁" begin a word; special symbols count as word starts so
    that a word never spans a special token. Every other piece continues the word
    before it.
    """
    table = np.array([s.startswith(SPM_WORD_START) for s in symbols], dtype=bool)
    table[:num_special] = True
    return table


@dataclass
class TokenMasker:
    """Chooses masked positions and how each is corrupted.

    A share `mask_prob` of the maskable units (tokens, or whole words when
    `word_starts` is given) is selected; each selected token becomes `mask_idx`
    with probability 1 - leave_unmasked_prob - random_token_prob, a uniformly
    drawn regular token with probability random_token_prob, and stays unchanged
    otherwise. Ids in `never_mask` (bos, eos, pad, unk, mask) are never selected.
    """

    mask_idx: int
    pad_idx: int
    never_mask: Sequence[int]
    random_token_ids: np.ndarray  # (R,) ids a randomly replaced token may take
    mask_prob: float = 0.15
    leave_unmasked_prob: float = 0.1
    random_token_prob: float = 0.1
    word_starts: Optional[np.ndarray] = None  # (V,) bool, enables whole-word masking

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"--mask-prob must be in (0, 1), got {self.mask_prob}")
        for name, p in (
            ("--leave-unmasked-prob", self.leave_unmasked_prob),
            ("--random-token-prob", self.random_token_prob),
        ):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if self.leave_unmasked_prob + self.random_token_prob > 1.0:
            raise ValueError(
                "--leave-unmasked-prob + --random-token-prob must not exceed 1, got "
                f"{self.leave_unmasked_prob} + {self.random_token_prob}"
            )
        self._never_mask = np.asarray(sorted(set(self.never_mask)), dtype=np.int64)

    def __call__(
        self, tokens: torch.Tensor, rng: np.random.Generator
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """tokens (T,) long -> (source (T,), target (T,)); target is pad where unmasked."""
        ids = tokens.numpy()
        maskable = np.ones(len(ids), dtype=bool)  # (T,)
        for special in self._never_mask:
            maskable &= ids != special

        # A masking unit is one token, or one word (a word start plus its continuations).
        if self.word_starts is not None:
            unit_of_token = np.cumsum(self.word_starts[ids]) - 1  # (T,)
        else:
            unit_of_token = np.arange(len(ids))
        units = np.unique(unit_of_token[maskable])
        # Rounding stochastically keeps the expected masked share at mask_prob even for
        # short samples, where int() alone would mask nothing.
        num_selected = int(self.mask_prob * len(units) + rng.random())
        unit_selected = np.zeros(len(ids), dtype=bool)  # indexed by unit id (< T)
        unit_selected[rng.choice(units, num_selected, replace=False)] = True
        selected = unit_selected[unit_of_token] & maskable  # (T,)

        corruption = rng.random(len(ids))  # (T,)
        keep_original = selected & (corruption < self.leave_unmasked_prob)
        use_random = (
            selected
            & (corruption >= self.leave_unmasked_prob)
            & (corruption < self.leave_unmasked_prob + self.random_token_prob)
        )
        use_mask = selected & ~keep_original & ~use_random

        source = ids.copy()
        source[use_mask] = self.mask_idx
        source[use_random] = rng.choice(self.random_token_ids, int(use_random.sum()))
        target = np.full_like(ids, self.pad_idx)
        target[selected] = ids[selected]
        return torch.from_numpy(source), torch.from_numpy(target)
