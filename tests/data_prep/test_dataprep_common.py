"""prep_common.py: publishing an output folder only once it is complete (and cleaning up after a
killed run), reading lines, the RAW layout and its language codes."""
from __future__ import annotations

import importlib
import os
import re
import subprocess
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


def _dead_pid() -> int:
    """The id of a process that has just ended."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_staging_left_by_a_killed_run_is_removed_by_the_next_one_which_says_so(common, tmp_path, capsys):
    final = tmp_path / "data-bin"
    stale = tmp_path / f".data-bin.tmp-{_dead_pid()}"
    (stale / "mono").mkdir(parents=True)
    running = tmp_path / f".data-bin.tmp-{os.getppid()}"  # a live process: maybe another run
    running.mkdir()
    with common.staged_folder(final) as staging:
        (staging / "manifest.json").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data-bin", running.name])
    assert f"note: removed {stale}, left by an interrupted run (process {stale.name.split('-')[-1]} is gone)" \
        in capsys.readouterr().out


def test_a_run_killed_between_its_renames_gets_the_old_folder_back(common, tmp_path, capsys):
    final = tmp_path / "data-bin"
    retired = tmp_path / f".data-bin.old-{_dead_pid()}"  # final was renamed away, then the kill
    retired.mkdir()
    (retired / "manifest.json").write_text("old")
    common.clean_stale_staging(final)
    assert (final / "manifest.json").read_text() == "old" and not retired.exists()
    assert f"note: restored {final} from {retired}" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["EN.train.txt", "en\\de.train.txt"])
def test_a_bad_language_code_in_a_file_name_names_the_file(common, tmp_path, name):
    (tmp_path / "mono").mkdir()
    (tmp_path / "mono" / name).write_text("x\n")
    with pytest.raises(common.DataPrepError, match=re.escape(f"file {tmp_path / 'mono' / name}: its name holds "
                                                             f"bad language code '{name.split('.')[0]}'")):
        common.scan_raw(tmp_path)


def test_a_bad_language_code_in_a_pair_file_name_names_the_file(common, tmp_path):
    (tmp_path / "para").mkdir()
    for name in ("en-DE.train.en", "en-DE.train.DE"):
        (tmp_path / "para" / name).write_text("x\n")
    with pytest.raises(common.DataPrepError, match=re.escape(f"file {tmp_path / 'para' / 'en-DE.train.DE'}: ")):
        common.scan_raw(tmp_path)


def test_the_force_hint_reads_well(common, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "dict.txt").write_text("a 1\n")
    with pytest.raises(common.DataPrepError) as error:
        common.check_output_folder(tmp_path / "out", False, "a binarized dataset")
    assert str(error.value) == (f"output folder {tmp_path / 'out'} already holds a binarized dataset; pass "
                                "--force to replace it (it is only replaced once the new one is complete)")
