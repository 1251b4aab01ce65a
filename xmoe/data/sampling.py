"""Re-balanced sampling across languages (or language pairs), as in XLM / XLM-R.

A corpus holding a share p_l of all tokens is drawn with probability
q_l = p_l^alpha / sum_k p_k^alpha: alpha = 1 keeps the natural mix, alpha -> 0
approaches uniform, and XLM-R's 0.3 lifts low-resource languages.
"""

from typing import Sequence

import numpy as np
from fairseq.data import ConcatDataset, FairseqDataset, ResamplingDataset


def alpha_sampling_probs(token_counts: Sequence[float], alpha: float) -> np.ndarray:
    """(L,) probabilities q_l proportional to (token share of l) ** alpha."""
    counts = np.asarray(token_counts, dtype=np.float64)
    if counts.ndim != 1 or len(counts) == 0 or (counts <= 0).any():
        raise ValueError(f"token counts must be a non-empty list of positives, got {counts}")
    shares = counts / counts.sum()
    weights = shares**alpha
    return weights / weights.sum()


def resample_by_alpha(
    corpora: Sequence[FairseqDataset], alpha: float, seed: int, epoch: int = 1, stream: int = 0
) -> ConcatDataset:
    """Concatenation of `corpora`, each resampled so that it makes up q_l of the items.

    The epoch keeps the natural total number of items. A corpus is drawn with
    replacement when it must grow and without when it shrinks; the draw depends
    on (seed, stream, corpus position, epoch) only and is redone by `set_epoch`;
    `stream` keeps the MLM and TLM draws of one seed apart.
    """
    probs = alpha_sampling_probs([float(np.sum(c.sizes)) for c in corpora], alpha)
    total_items = sum(len(c) for c in corpora)
    resampled = []
    for position, (corpus, prob) in enumerate(zip(corpora, probs)):
        size_ratio = prob * total_items / len(corpus)
        # distinct seed per corpus, so equally sized corpora don't share a draw pattern
        corpus_seed = int(np.random.SeedSequence([seed, stream, position]).generate_state(1)[0])
        resampled.append(
            ResamplingDataset(
                corpus,
                replace=size_ratio >= 1.0,
                size_ratio=size_ratio,
                seed=corpus_seed,
                epoch=epoch,
            )
        )
    return ConcatDataset(resampled)
