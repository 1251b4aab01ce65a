"""A run resumed mid-epoch with other workers, batch size or update_freq trains on the samples
not yet seen, each once (xmoe/data/epoch_position.py).

Training legs are simulated the way fairseq drives the iterators: every worker takes
update_freq batches per update, and the checkpoint holds rank 0's iterator state.
"""

import logging
from collections import Counter

import pytest

TOKENS_PER_SAMPLE = 32


def train_leg(task, state, workers: int, batch_size: int, update_freq: int, updates=None):
    """Sample ids one leg trains on, and the checkpoint state it ends with (None: epoch done).
    `updates` None trains to the end of the epoch."""
    epoch = state["epoch"] if state else 1
    task.load_dataset("train", epoch=epoch)
    iterators = [
        task.get_batch_iterator(
            task.dataset("train"), max_tokens=4096, max_sentences=batch_size,
            max_positions=task.max_positions(), seed=1, num_shards=workers, shard_id=rank,
            epoch=epoch, required_batch_size_multiple=8,
        )
        for rank in range(workers)
    ]
    for iterator in iterators:
        if state:
            iterator.load_state_dict(state)
    epoch_itrs = [iterator.next_epoch_itr(shuffle=True) for iterator in iterators]
    ids, done = [], 0
    while updates is None or done < updates:
        update = [next(itr, None) for itr in epoch_itrs for _ in range(update_freq)]
        if all(batch is None for batch in update):
            break
        for batch in update:
            if batch:  # fairseq pads a short epoch with empty batches
                ids += batch["id"].tolist()
        done += 1
    if updates is not None:
        assert done == updates, "the epoch ended before the leg did: use fewer updates"
    return ids, iterators[0].state_dict()


def first_pass(ids, num_samples: int):
    """Ids of the epoch's samples proper; larger ids are the shorter stream's top-up passes."""
    return sorted(i for i in ids if i < num_samples)


# legs: (workers, per-worker batch size, update_freq, updates); the last leg ends the epoch
LEGS = {
    "global batch kept by the batch size": [(2, 8, 1, 5), (1, 16, 1, 4), (4, 4, 1, None)],
    "global batch kept by update_freq": [(2, 8, 1, 5), (1, 8, 2, 4), (2, 8, 1, None)],
    "per-worker batch unchanged": [(2, 8, 1, 5), (1, 8, 1, 6), (4, 8, 1, None)],
    "a global batch that does not divide": [(2, 8, 1, 5), (3, 5, 1, 3), (4, 4, 1, None)],
    "back to the batching of the leg before": [(2, 8, 1, 5), (1, 16, 1, 3), (1, 16, 1, None)],
}


@pytest.mark.parametrize("legs", list(LEGS.values()), ids=list(LEGS))
def test_resume_on_other_workers_trains_every_sample_of_the_epoch_once(data_dir, new_task, legs):
    task = new_task(data_dir, tokens_per_sample=TOKENS_PER_SAMPLE)
    whole, end_state = train_leg(task, None, workers=2, batch_size=8, update_freq=1)
    num_samples = len(task.dataset("train"))
    assert end_state["epoch"] == 2 and "xmoe_position" not in end_state
    assert first_pass(whole, num_samples) == list(range(num_samples))

    resumed, state = [], None
    for workers, batch_size, update_freq, updates in legs:
        task = new_task(data_dir, tokens_per_sample=TOKENS_PER_SAMPLE)  # a fresh process
        ids, state = train_leg(task, state, workers, batch_size, update_freq, updates)
        resumed += ids
        if updates is not None:
            assert state["epoch"] == 1 and state["xmoe_position"]["samples_trained"] == len(resumed)
    assert state["epoch"] == 2
    assert first_pass(resumed, num_samples) == first_pass(whole, num_samples)
    repeated = [i for i, n in Counter(resumed).items() if n > 1]
    assert repeated == []


def test_the_resume_log_line_says_where_the_epoch_continues(data_dir, new_task, caplog):
    task = new_task(data_dir, tokens_per_sample=TOKENS_PER_SAMPLE)
    ids, state = train_leg(task, None, workers=2, batch_size=8, update_freq=1, updates=3)
    with caplog.at_level(logging.INFO, logger="xmoe.data.epoch_position"):
        train_leg(new_task(data_dir, tokens_per_sample=TOKENS_PER_SAMPLE), state, 1, 16, 1, updates=1)
    assert (
        f"xmoe_mlm_tlm: epoch 1 resumes after {len(ids)} of its samples (6 global batches of "
        "2 workers x batch size 8 x max tokens 4096) with the samples not yet seen, batched for "
        "1 worker x batch size 16 x max tokens 4096"
    ) in caplog.messages


def test_a_checkpoint_without_the_global_position_resumes_as_fairseq_did_and_says_so(
    data_dir, new_task, caplog
):
    task = new_task(data_dir, tokens_per_sample=TOKENS_PER_SAMPLE)
    _, state = train_leg(task, None, workers=2, batch_size=8, update_freq=1, updates=3)
    del state["xmoe_position"]
    with caplog.at_level(logging.INFO, logger="xmoe.data.epoch_position"):
        _, after = train_leg(new_task(data_dir, tokens_per_sample=TOKENS_PER_SAMPLE), state, 1, 16, 1, updates=1)
    assert after["iterations_in_epoch"] == 3 + 1  # fairseq's per-worker count, unconverted
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "records no global data position" in warnings[0] and "batch 3 of each worker" in warnings[0]


def test_other_samples_than_at_the_checkpoint_restart_the_epoch_and_say_so(data_dir, new_task, caplog):
    task = new_task(data_dir, tokens_per_sample=TOKENS_PER_SAMPLE)
    ids, state = train_leg(task, None, workers=2, batch_size=8, update_freq=1, updates=3)
    with caplog.at_level(logging.INFO, logger="xmoe.data.epoch_position"):
        longer_blocks = new_task(data_dir, tokens_per_sample=2 * TOKENS_PER_SAMPLE)
        again, _ = train_leg(longer_blocks, state, 2, 8, 1, updates=3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "cannot continue where it stopped" in warnings[0]  # one per worker
    assert f"repeating the {len(ids)} samples trained before" in warnings[0]
    longer_blocks.load_dataset("train")
    fresh, _ = train_leg(longer_blocks, None, 2, 8, 1, updates=3)
    assert again == fresh  # the epoch from its first batch
