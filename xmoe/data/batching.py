"""Batch construction for grouped streams: per-group batches and ratio interleaving.

All functions are pure given their numpy generator, so the batches of an epoch
are a function of (seed, epoch, batching options) and resume reproduces them.
"""

import math
from typing import Callable, List, Optional, Sequence

import numpy as np
from fairseq.data import data_utils

Batches = List[np.ndarray]


def batches_by_size(
    sizes: np.ndarray,
    rng: np.random.Generator,
    max_tokens: Optional[int],
    max_sentences: Optional[int],
    required_batch_size_multiple: int = 1,
) -> Batches:
    """Shuffled batches of local indices 0..len(sizes)-1 of similar length.

    Items are shuffled, then stably sorted by size (so equal sizes come out in a
    random order), cut into batches by fairseq's batch_by_size, and the batch order
    is shuffled. Every item lands in exactly one batch: fairseq drops a last batch
    whose size is not a multiple of `required_batch_size_multiple`; it is kept here,
    so that an epoch trains on every sample (and a resumed one on every sample left).
    """
    order = rng.permutation(len(sizes))
    order = order[np.argsort(sizes[order], kind="stable")]
    batches = data_utils.batch_by_size(
        order,
        num_tokens_fn=lambda i: int(sizes[i]),
        num_tokens_vec=sizes[order].astype(np.int64),
        max_tokens=max_tokens,
        max_sentences=max_sentences,
        required_batch_size_multiple=required_batch_size_multiple,
    )
    batched = sum(len(b) for b in batches)
    if batched < len(order):
        batches.append(order[batched:])  # the remainder fairseq dropped (items of the last batch)
    return [batches[i] for i in rng.permutation(len(batches))]


def interleave_streams(
    stream_passes: Sequence[Callable[[int], Batches]],
    ratio: Sequence[int],
    slot_size: int = 1,
    max_passes: int = 1000,
) -> Batches:
    """Interleave batch streams as repeating cycles of `ratio[k] * slot_size` batches of stream k.

    `stream_passes[k](p)` returns the batches of pass p over stream k. The epoch
    lasts until every stream with a non-zero ratio has delivered its first pass;
    a stream that runs out earlier continues with further passes (fresh shuffles).
    `slot_size` is the number of data-parallel workers: fairseq hands batch i to
    worker i % slot_size, so slots of that many same-stream batches make every
    worker see the same stream at the same step.

    A pass may come back empty when a resumed epoch has already trained on all of it
    (see xmoe/data/epoch_position.py); the epoch then lasts until the other streams'
    first passes are done, and nothing is left when every first pass is empty.
    `max_passes` bounds the passes drawn from one stream (a stream without samples).
    """
    if len(stream_passes) != len(ratio):
        raise ValueError(f"{len(stream_passes)} streams but {len(ratio)} ratio entries")
    active = [k for k, share in enumerate(ratio) if share > 0]
    if not active:
        raise ValueError(f"the interleaving ratio {list(ratio)} has no positive entry")
    first_pass = {k: list(stream_passes[k](0)) for k in active}
    batches_per_cycle = {k: ratio[k] * slot_size for k in active}
    num_cycles = max(math.ceil(len(first_pass[k]) / batches_per_cycle[k]) for k in active)

    drawn = {}
    for k in active:
        needed = num_cycles * batches_per_cycle[k]
        batches, next_pass = first_pass[k], 1
        while len(batches) < needed:
            if next_pass > max_passes:
                raise ValueError(f"stream {k} has no batches but its ratio is {ratio[k]}")
            batches += list(stream_passes[k](next_pass))
            next_pass += 1
        drawn[k] = batches[:needed]

    interleaved: Batches = []
    for cycle in range(num_cycles):
        for k in active:
            n = batches_per_cycle[k]
            interleaved += drawn[k][cycle * n : (cycle + 1) * n]
    return interleaved
