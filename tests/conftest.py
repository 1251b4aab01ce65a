"""Shared test fixtures: a generated toy corpus and a safe way to run fairseq's CLIs.

CLI helpers run every command in its own process group and kill the whole group when it fails
or overruns, so a hung torchrun worker can never outlive its test.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # fairseq-train & co. live beside this interpreter
USER_DIR = REPO_ROOT / "xmoe"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def task():
    """A stand-in fairseq task for building models directly: a 20-word dictionary."""
    from fairseq.data import Dictionary

    dictionary = Dictionary()
    for i in range(20):
        dictionary.add_symbol(f"w{i}")
    return SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary, dictionary=dictionary)


def load_script(name: str):
    """Import scripts/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def script():
    """Import scripts/<name>.py as a module: script("make_toy_data")."""
    return load_script


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """A binarized toy corpus for fairseq's masked_lm task (dict.txt, train/valid .bin/.idx)."""
    out_dir = tmp_path_factory.mktemp("toy_data")
    load_script("make_toy_data").write_toy_corpus(out_dir, train_lines=2000, valid_lines=100, seed=1)
    return out_dir


@dataclass
class CliRun:
    returncode: int
    output: str  # stdout and stderr, interleaved

    def json_logs(self, tag: str) -> list[dict]:
        """The JSON records fairseq logged under `tag` ("train_inner", "train", "valid")."""
        records = []
        for line in self.output.splitlines():
            # fairseq-train writes "... | train_inner | {...}", Hydra's logging "[train_inner][INFO] - {...}"
            if (f"| {tag} | {{" in line or f"[{tag}][INFO] - {{" in line) and line.rstrip().endswith("}"):
                records.append(json.loads(line[line.index("{"):]))
        return records


def cli_env() -> dict[str, str]:
    """Environment for CLI runs: weights_only loading forced on, one thread per process."""
    env = dict(os.environ)
    # Resume must work with torch's safe loading, never by switching it off.
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    env["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(args: list[str], timeout: float, cwd: Optional[Path] = None, log_file: Optional[Path] = None) -> CliRun:
    """Run a command in a new process group; kill the group on timeout or error. Never raises
    on a non-zero exit: callers assert on the returned CliRun (with its output in the message)."""
    proc = subprocess.Popen(
        [str(a) for a in args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(cwd or REPO_ROOT),
        env=cli_env(),
        start_new_session=True,  # own process group: torchrun's workers included
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except BaseException:
        _kill_group(proc)
        output, _ = proc.communicate()
        output += f"\n[run_cli] killed after {timeout} s (or interrupted)"
        if log_file:
            log_file.write_text(output)
        return CliRun(returncode=-9, output=output)
    finally:
        _kill_group(proc)  # stray children of a finished command
    if log_file:
        log_file.write_text(output)
    return CliRun(returncode=proc.returncode, output=output)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def assert_ok(run: CliRun) -> None:
    assert run.returncode == 0, f"exit code {run.returncode}; last output:\n{run.output[-6000:]}"


def fairseq_train_args(data: Path, save_dir: Path, arch: str = "xmoe_tiny", max_update: int = 30) -> list[str]:
    """Options for a small, fast CPU masked-LM run on the toy corpus (train only, JSON logs)."""
    return [
        data,
        "--user-dir", USER_DIR,
        "--task", "masked_lm", "--criterion", "xmoe_masked_lm", "--arch", arch,
        "--tokens-per-sample", "64", "--sample-break-mode", "complete",
        "--batch-size", "16", "--num-workers", "0", "--cpu", "--seed", "1",
        # No background prefetch thread: fairseq's BufferedIterator thread, caught inside a torch
        # op when the interpreter exits, aborts the process (SIGABRT) after training finished.
        "--data-buffer-size", "0",
        "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--clip-norm", "1.0",
        "--lr", "0.01", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "5",
        "--dropout", "0.0", "--attention-dropout", "0.0",
        "--max-update", str(max_update), "--disable-validation",
        "--save-dir", save_dir, "--no-epoch-checkpoints",
        "--log-format", "json", "--log-interval", "5",
    ]


@pytest.fixture(scope="session")
def cli():
    """Helpers for CLI tests: cli.run, cli.ok, cli.train_args, cli.env, cli.bin, cli.repo, cli.Result."""

    class Cli:
        run = staticmethod(run_cli)
        env = staticmethod(cli_env)
        ok = staticmethod(assert_ok)
        train_args = staticmethod(fairseq_train_args)
        bin = VENV_BIN
        repo = REPO_ROOT
        user_dir = USER_DIR
        Result = CliRun  # for output read elsewhere, e.g. a slurm job's output file

    return Cli
