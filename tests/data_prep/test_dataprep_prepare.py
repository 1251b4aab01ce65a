"""prepare.sh: the three steps in order, each skipped once its output is complete."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .dataprep_helpers import folder_hashes


@pytest.mark.slow  # trains a tiny model and binarizes once more
def test_prepare_uses_a_given_corpus_then_skips_every_finished_step(raw_corpus, tmp_path, run):
    raw = Path(shutil.copytree(raw_corpus, tmp_path / "raw"))  # a RAW the user brought
    args = ["--cache", tmp_path / "work", "--raw", raw, "--langs", "en zh-cn", "--vocab-size",
            "250", "--workers", "1", "--spm-args", "--sentences-per-language 150"]
    first = run("prepare.sh", *args)
    assert first.returncode == 0, first.stderr
    assert f"skip: {raw} already holds a RAW corpus" in first.stderr  # no apt call
    assert "+ " in first.stderr and "train_spm.py" in first.stderr and "binarize.py" in first.stderr
    data = tmp_path / "work" / "data-bin"
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["languages"] == ["en", "zh-cn"] and manifest["pairs"] == ["en-zh-cn"]
    info = json.loads((tmp_path / "work" / "spm" / "spm_info.json").read_text())
    assert info["vocab_size"] == 250 and info["sampled_lines"] == {"en": 150, "zh-cn": 150}

    before = folder_hashes(tmp_path / "work")
    second = run("prepare.sh", *args)
    assert second.returncode == 0, second.stderr
    assert second.stderr.count("skip: ") == 4
    assert "(the RAW corpus was brought), so no topic task" in second.stderr
    assert folder_hashes(tmp_path / "work") == before


def test_prepare_rejects_unknown_options(run):
    result = run("prepare.sh", "--no-such-option")
    assert result.returncode == 2
    assert "unknown option --no-such-option" in result.stderr
    assert run("prepare.sh", "--help").stdout.startswith("usage: data-prep/prepare.sh")
