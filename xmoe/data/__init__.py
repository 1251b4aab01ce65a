"""Datasets behind the `xmoe_mlm_tlm` task.

monolingual_blocks / parallel_pairs build unmasked MLM and TLM samples, sampling
re-balances languages, masking corrupts tokens, grouped_dataset masks, collates
and batches them (batching holds the pure batch-order helpers).
"""

from xmoe.data.batching import batches_by_size, interleave_streams
from xmoe.data.grouped_dataset import GroupedMaskedDataset
from xmoe.data.masking import TokenMasker, word_start_table
from xmoe.data.monolingual_blocks import MonolingualBlockDataset
from xmoe.data.parallel_pairs import ParallelPairDataset, fit_pair_lengths
from xmoe.data.sampling import alpha_sampling_probs, resample_by_alpha

__all__ = [
    "GroupedMaskedDataset",
    "MonolingualBlockDataset",
    "ParallelPairDataset",
    "TokenMasker",
    "alpha_sampling_probs",
    "batches_by_size",
    "fit_pair_lengths",
    "interleave_streams",
    "resample_by_alpha",
    "word_start_table",
]
