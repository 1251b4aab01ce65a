"""prep_common.py: publishing an output folder only once it is complete."""
from __future__ import annotations

import importlib
import sys

import pytest

from .dataprep_helpers import DATA_PREP


@pytest.fixture(scope="module")
def common():
    # the scripts import it by name from their folder, and so does this test
    if str(DATA_PREP) not in sys.path:
        sys.path.insert(0, str(DATA_PREP))
    return importlib.import_module("prep_common")


def test_an_interrupted_write_leaves_the_old_folder_and_no_staging(common, tmp_path):
    final = tmp_path / "data-bin"
    final.mkdir()
    (final / "manifest.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with common.staged_folder(final) as staging:
            (staging / "manifest.json").write_text("half")
            raise KeyboardInterrupt
    assert (final / "manifest.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["data-bin"]


def test_a_finished_write_replaces_the_old_folder_whole(common, tmp_path):
    final = tmp_path / "data-bin"
    final.mkdir()
    (final / "stale.bin").write_text("old")
    with common.staged_folder(final) as staging:
        (staging / "manifest.json").write_text("new")
        assert not (final / "manifest.json").exists()  # invisible until the end
    assert sorted(p.name for p in final.iterdir()) == ["manifest.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["data-bin"]


def test_lines_split_on_newline_only(common, tmp_path):
    # U+2028 (line separator) inside a sentence must not shift the alignment of parallel files
    path = tmp_path / "x.txt"
    path.write_bytes("a\u2028b\r\nc\n\ufeff\n".encode("utf-8"))
    assert common.read_lines(path) == ["a\u2028b", "c", "\ufeff"]


def test_pair_names_with_hyphenated_language_codes_are_understood(common, tmp_path):
    (tmp_path / "para").mkdir()
    for name in ("en-zh-cn.train.en", "en-zh-cn.train.zh-cn", "pt-br-en.valid.pt-br",
                 "pt-br-en.valid.en"):
        (tmp_path / "para" / name).write_text("x\n")
    corpus = common.scan_raw(tmp_path)
    assert sorted(corpus.para) == [("en", "zh-cn", "train"), ("pt-br", "en", "valid")]
