"""kill -9 at several moments while fairseq-train writes checkpoints; the save dir always resumes.

fairseq writes each checkpoint to <name>.tmp and renames it (atomic), then copies it to
checkpoint_last.pt, which xmoe.expert_checkpoint turns into a copy to a temporary file and a
rename. The run below saves after every update (--save-interval-updates 1), with FFNs wide
enough that a checkpoint takes tens of milliseconds to write, and is killed (SIGKILL, the
whole process group) while torch.save writes a .tmp file, while the copy to checkpoint_last.pt
is under way, and at random moments. After every kill checkpoint_last.pt must load with
weights_only, hold at least as many updates as before, and the next start must resume from it.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .lifecycle_helpers import load, num_updates, set_option

pytestmark = pytest.mark.slow

SAVE_TMP = re.compile(r"^checkpoint_\d+_(\d+)\.pt\.tmp$")  # torch.save in progress (fairseq)
COPY_TMP = "checkpoint_last.pt.tmp-copy"  # copy to checkpoint_last.pt in progress (xmoe)
MOMENTS = ["writing", "copying", "random", "writing", "copying"]
WAIT_S = 90  # for one moment to come, start-up included


def _files_changed_since(save_dir: Path, since_ns: int) -> list[str]:
    names = []
    with os.scandir(save_dir) as entries:
        for entry in entries:
            try:
                if entry.stat().st_mtime_ns >= since_ns:
                    names.append(entry.name)
            except FileNotFoundError:  # renamed away between listing and stat
                pass
    return names


def _wait_for(moment: str, save_dir: Path, since_ns: int, after_update: int, proc, rng: random.Random) -> str:
    """Return (what was seen) as soon as `moment` has come in the run started at since_ns."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before the kill")
        # Kill only once there is something to resume from (a first kill may otherwise hit
        # the very first save, and the next start would rightly begin from scratch).
        if (save_dir / "checkpoint_last.pt").exists():
            changed = _files_changed_since(save_dir, since_ns)
            writing = [n for n in changed if (m := SAVE_TMP.match(n)) and int(m.group(1)) > after_update]
            if moment == "writing" and writing:
                return writing[0]
            if moment == "copying" and COPY_TMP in changed:
                return COPY_TMP
            if moment == "random" and "checkpoint_last.pt" in changed:
                delay = rng.uniform(0.0, 0.6)
                time.sleep(delay)
                return f"{delay:.2f} s after a new checkpoint_last.pt"
        time.sleep(0.002)
    raise AssertionError(f"'{moment}' did not come within {WAIT_S} s")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _loaded_update(log_text: str):
    match = re.search(r"Loaded checkpoint \S+checkpoint_last\.pt \(epoch \d+ @ (\d+) updates\)", log_text)
    return int(match.group(1)) if match else None


def test_kill_9_while_writing_checkpoints_leaves_a_save_dir_that_resumes(cli, toy_data, tmp_path):
    save_dir = tmp_path / "ckpt"
    args = cli.train_args(toy_data, save_dir, max_update=100_000)
    for option, value in (
        ("--encoder-ffn-embed-dim", 1024),  # ~17 MB checkpoints: writes take a while
        ("--save-interval-updates", 1),
        ("--keep-interval-updates", 2),
        ("--log-interval", 1),
    ):
        args = set_option(args, option, value)
    command = [str(a) for a in [cli.bin / "fairseq-train", *args]]
    rng = random.Random(20240611)
    last_update = 0
    history = []
    for cycle, moment in enumerate(MOMENTS):
        log_path = tmp_path / f"run{cycle}.log"
        started_ns = time.time_ns()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cli.repo,
                                    env=cli.env(), start_new_session=True)
        try:
            seen = _wait_for(moment, save_dir, started_ns, last_update, proc, rng)
        finally:
            _kill_group(proc)
        log_text = log_path.read_text()
        if last_update:
            assert _loaded_update(log_text) == last_update, f"run {cycle} did not resume:\n{log_text[-3000:]}"

        state = load(save_dir / "checkpoint_last.pt")  # weights_only; raises on a damaged file
        updates = num_updates(state)
        history.append((moment, seen, updates))
        assert updates >= last_update, history
        last_update = updates
    assert last_update > 0, history

    final = cli.run([cli.bin / "fairseq-train", *set_option(args, "--max-update", last_update + 2)], timeout=180,
                    log_file=tmp_path / "final.log")
    cli.ok(final)
    assert _loaded_update(final.output) == last_update, history
    assert num_updates(load(save_dir / "checkpoint_last.pt")) == last_update + 2
