"""Fixtures for the upcycling tests: a dense_tiny checkpoint trained by fairseq-train on the toy
corpus (a few seconds, once per session), and a runner for the xmoe-upcycle command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

DENSE_UPDATES = 60


@pytest.fixture(scope="session")
def dense_run(cli, toy_data, tmp_path_factory):
    """(dense_tiny checkpoint_last.pt after DENSE_UPDATES updates, the fairseq-train run)."""
    save_dir = tmp_path_factory.mktemp("dense_tiny")
    args = cli.train_args(toy_data, save_dir, arch="dense_tiny", max_update=DENSE_UPDATES)
    run = cli.run([cli.bin / "fairseq-train", *args], timeout=240)
    cli.ok(run)
    return save_dir / "checkpoint_last.pt", run


@pytest.fixture(scope="session")
def dense_checkpoint(dense_run) -> Path:
    return dense_run[0]


@pytest.fixture(scope="session")
def upcycle_cli(cli):
    """Run `xmoe-upcycle ARGS...` as a user does (python -m, so no reinstall is needed)."""

    def run(*args):
        return cli.run([sys.executable, "-m", "xmoe.checkpoints.upcycle", *args], timeout=120)

    return run
