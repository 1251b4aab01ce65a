#!/usr/bin/env python
"""A fairseq-train worker (scripts/fairseq_train_torchrun.py) that records which samples it trains on.

    torchrun --nproc-per-node W tests/lifecycle/record_sample_ids.py OUT_DIR <fairseq-train args>

Every rank appends, for each update, the ids of the samples of its real batches (fairseq's
dummy batches for an exhausted worker are left out) as one line to OUT_DIR/rank{R}.txt.
"""

from __future__ import annotations

import sys
from pathlib import Path

from record_loaded_state import run_torchrun_worker


def main() -> None:
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    import fairseq_cli.train  # noqa: F401  (first: it sets fairseq's log format, which the tests parse)
    import torch.distributed as dist
    from fairseq.trainer import Trainer

    train_step = Trainer.train_step

    def train_step_and_record(self, samples, *args, **kwargs):
        ids = [int(i) for sample in samples if sample for i in sample["id"]]
        rank = dist.get_rank() if dist.is_initialized() else 0
        with open(out_dir / f"rank{rank}.txt", "a") as f:
            f.write(" ".join(map(str, ids)) + "\n")
        return train_step(self, samples, *args, **kwargs)

    Trainer.train_step = train_step_and_record
    run_torchrun_worker(sys.argv[2:])


if __name__ == "__main__":
    main()
