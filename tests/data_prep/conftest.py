"""Fixtures for the data-prep tests (helpers live in dataprep_helpers.py)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from .dataprep_helpers import run_script, write_raw_corpus


@pytest.fixture(scope="session")
def run() -> Callable[..., subprocess.CompletedProcess]:
    return run_script


@pytest.fixture(scope="session")
def raw_corpus(tmp_path_factory) -> Path:
    """The generated RAW corpus; read-only by convention (copy it before changing it)."""
    return write_raw_corpus(tmp_path_factory.mktemp("corpus") / "raw")


@pytest.fixture
def raw_copy(raw_corpus, tmp_path) -> Path:
    """A private copy of the RAW corpus that a test may damage."""
    return Path(shutil.copytree(raw_corpus, tmp_path / "raw"))


@pytest.fixture(scope="session")
def spm_dir(raw_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spm") / "spm"
    result = run_script("train_spm.py", "--raw", raw_corpus, "--out", out, "--vocab-size", "300",
                        "--sentences-per-language", "200", "--langs", "en", "de", "zh-cn")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def data_bin(raw_corpus, spm_dir, tmp_path_factory) -> Path:
    """The corpus binarized with one worker."""
    out = tmp_path_factory.mktemp("data") / "data-bin"
    result = run_script("binarize.py", "--raw", raw_corpus, "--spm-model", spm_dir / "spm.model",
                        "--dict", spm_dir / "dict.txt", "--out", out, "--workers", "1",
                        "--langs", "en", "de", "zh-cn")
    assert result.returncode == 0, result.stderr
    return out
