"""Elastic resume continues the data stream: fairseq-train on the xmoe_mlm_tlm task, one epoch
uninterrupted on 2 processes against the same epoch trained 2 -> 1 -> 4 processes, keeping the
global batch of 8 sentences by update_freq (2x4 -> 1x4x2) and by the batch size (-> 4x2).
Every rank records the sample ids it trains on (record_sample_ids.py).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tasks.conftest import make_binarized, mlm_tlm_train_args  # tests/ is on sys.path (pytest rootdir import)

from .lifecycle_helpers import torchrun_command

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

RECORD_SAMPLE_IDS = Path(__file__).resolve().parent / "record_sample_ids.py"
# (processes, batch size, update_freq, --max-update); the last leg ends the epoch (14 updates on 2x4)
LEGS = [(2, 4, 1, 4), (1, 4, 2, 8), (4, 2, 1, None)]


def task_args(cli, data: Path, save_dir: Path, batch_size: int, update_freq: int, max_update) -> list:
    args = mlm_tlm_train_args(cli, data, save_dir, **{
        "--batch-size": batch_size, "--update-freq": update_freq, "--max-update": max_update or 1000,
        "--log-interval": 1,
    })
    return args + (["--max-epoch", "1"] if max_update is None else [])


def recorded_ids(out_dir: Path) -> list[int]:
    return [int(i) for path in sorted(out_dir.glob("rank*.txt")) for i in path.read_text().split()]


def test_two_one_four_processes_train_the_epoch_as_the_uninterrupted_run(cli, tmp_path):
    data = Path(make_binarized(
        str(tmp_path / "data"), train_lines={"en": 80, "de": 40, "fr": 20}, train_pairs={"en-de": 40},
        valid_lines={"en": 5, "de": 5, "fr": 5}, valid_pairs={"en-de": 5},
    ))

    def train(name: str, processes: int, batch_size: int, update_freq: int, max_update, log: str):
        args = task_args(cli, data, tmp_path / f"{name}_checkpoints", batch_size, update_freq, max_update)
        command = torchrun_command(cli, processes, args, script=RECORD_SAMPLE_IDS, script_args=(tmp_path / name,))
        run = cli.run(command, timeout=180, log_file=tmp_path / f"{log}.log")
        cli.ok(run)
        return run

    whole = train("whole", 2, 4, 1, None, log="whole")
    runs = [train("elastic", *leg, log=f"elastic_leg{i}") for i, leg in enumerate(LEGS)]
    uninterrupted, elastic = recorded_ids(tmp_path / "whole"), recorded_ids(tmp_path / "elastic")
    assert int(whole.json_logs("train")[-1]["train_num_updates"]) == 14

    num_samples = 49 + 40  # MLM blocks + TLM pairs of the epoch ("split 'train': mlm 49, tlm 40")
    assert "split 'train': mlm 49, tlm 40 samples" in whole.output
    first_pass = lambda ids: sorted(i for i in ids if i < num_samples)  # noqa: E731
    assert first_pass(uninterrupted) == list(range(num_samples))
    assert first_pass(elastic) == first_pass(uninterrupted)
    assert [i for i, n in Counter(elastic).items() if n > 1] == []
    # each resume says where it continues, in one line
    assert "epoch 1 resumes after 32 of its samples (8 global batches of 2 workers x batch size 4) " \
           "with the samples not yet seen, batched for 1 worker x batch size 4" in runs[1].output
    assert "epoch 1 resumes after 64 of its samples (8 global batches of 2 workers x batch size 4; " \
           "8 global batches of 1 worker x batch size 4) with the samples not yet seen, batched for " \
           "4 workers x batch size 2" in runs[2].output
