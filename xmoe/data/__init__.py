"""Datasets behind the `xmoe_mlm_tlm` task.

monolingual_blocks / parallel_pairs build unmasked MLM and TLM samples, sampling
re-balances languages, masking corrupts tokens, grouped_dataset masks, collates
and batches them (batching holds the pure batch-order helpers), and epoch_position
keeps the epoch's global position across resumes on other numbers of workers.
"""

from xmoe.data.batching import batches_by_size, interleave_streams
from xmoe.data.epoch_position import ElasticEpochBatchIterator
from xmoe.data.grouped_dataset import GroupedMaskedDataset, size_limit
from xmoe.data.masking import TokenMasker, word_start_table
from xmoe.data.monolingual_blocks import MonolingualBlockDataset
from xmoe.data.parallel_pairs import ParallelPairDataset, fit_pair_lengths
from xmoe.data.sampling import alpha_sampling_probs, resample_by_alpha

__all__ = [
    "ElasticEpochBatchIterator",
    "GroupedMaskedDataset",
    "MonolingualBlockDataset",
    "ParallelPairDataset",
    "TokenMasker",
    "alpha_sampling_probs",
    "batches_by_size",
    "fit_pair_lengths",
    "interleave_streams",
    "resample_by_alpha",
    "size_limit",
    "word_start_table",
]
