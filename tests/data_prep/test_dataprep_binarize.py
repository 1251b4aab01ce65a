"""binarize.py: RAW text -> fairseq mmap datasets + manifest, and its refusals on bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from .dataprep_helpers import BLANK_LINES_IN_EN_TRAIN, MONO_SIZES, PARA_SIZES, folder_hashes


def _read_text(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").split("\n")[:-1] if line.strip()]


def test_manifest_lists_languages_pairs_and_line_counts(data_bin, raw_corpus):
    manifest = json.loads((data_bin / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert manifest["languages"] == ["en", "de", "zh-cn"]  # the order given by --langs
    assert manifest["pairs"] == ["en-de", "en-zh-cn"]
    assert manifest["spm_model"] == "spm.model" and manifest["dictionary"] == "dict.txt"
    for split in ("train", "valid", "test"):
        expected_mono = {lang: len(_read_text(raw_corpus / "mono" / f"{lang}.{split}.txt"))
                         for lang in ("en", "de", "zh-cn")}
        assert manifest["sizes"][split]["mono"] == expected_mono
        assert manifest["sizes"][split]["para"] == {"en-de": PARA_SIZES[split],
                                                    "en-zh-cn": PARA_SIZES[split]}
    # blank lines (document breaks) are not items
    assert manifest["sizes"]["train"]["mono"]["en"] == MONO_SIZES["train"]
    assert len((raw_corpus / "mono" / "en.train.txt").read_text().split("\n")) - 1 == \
        MONO_SIZES["train"] + BLANK_LINES_IN_EN_TRAIN


def test_manifest_records_what_the_task_checks_at_load_time(data_bin):
    from fairseq.data import Dictionary
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    manifest = json.loads((data_bin / "manifest.json").read_text())
    assert manifest["dictionary_size"] == len(Dictionary.load(str(data_bin / "dict.txt")))
    stems = sorted(str(p.relative_to(data_bin))[: -len(".bin")] for p in data_bin.rglob("*.bin"))
    assert sorted(manifest["files"]) == stems
    for stem, record in manifest["files"].items():
        items = MMapIndexedDataset(str(data_bin / stem))
        assert record == {
            "items": len(items),
            "bin_bytes": (data_bin / f"{stem}.bin").stat().st_size,
            "max_id": max(int(items[i].max()) for i in range(len(items))),
        }


def test_dictionary_and_model_are_copied_byte_for_byte(data_bin, spm_dir):
    assert (data_bin / "dict.txt").read_bytes() == (spm_dir / "dict.txt").read_bytes()
    assert (data_bin / "spm.model").read_bytes() == (spm_dir / "spm.model").read_bytes()


def test_items_decode_back_to_the_input_text(data_bin, raw_corpus):
    from fairseq.data import Dictionary
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    dictionary = Dictionary.load(str(data_bin / "dict.txt"))
    processor = spm.SentencePieceProcessor(model_file=str(data_bin / "spm.model"))
    datasets = [("mono/en/train", raw_corpus / "mono" / "en.train.txt"),
                ("mono/zh-cn/valid", raw_corpus / "mono" / "zh-cn.valid.txt"),
                ("para/en-zh-cn/test.zh-cn", raw_corpus / "para" / "en-zh-cn.test.zh-cn"),
                ("para/en-de/train.de", raw_corpus / "para" / "en-de.train.de")]
    checked = 0
    for stem, source in datasets:
        dataset = MMapIndexedDataset(str(data_bin / stem))
        lines = _read_text(source)
        assert len(dataset) == len(lines)
        assert dataset.sizes.dtype.kind == "i" and dataset[0].dtype.itemsize <= 8
        for item, line in zip(dataset, lines):
            ids = item.tolist()
            assert ids[-1] == dictionary.eos() and dictionary.eos() not in ids[:-1]
            pieces = [dictionary[i] for i in ids[:-1]]
            # Characters outside --character-coverage are <unk> in both vocabularies.
            assert pieces == [processor.id_to_piece(i) for i in processor.encode(line)]
            # the text comes back up to sentencepiece's own normalisation (NFKC, spaces squeezed)
            assert processor.decode_pieces(pieces) == processor.decode(processor.encode(line))
            checked += 1
    assert checked == MONO_SIZES["train"] + MONO_SIZES["valid"] + PARA_SIZES["test"] + \
        PARA_SIZES["train"]


@pytest.mark.slow  # one more binarize run (fairseq import included)
def test_output_is_identical_for_any_workers_and_chunk_size(data_bin, raw_corpus, spm_dir,
                                                             tmp_path, run):
    out = tmp_path / "data-bin"
    result = run("binarize.py", "--raw", raw_corpus, "--spm-model", spm_dir / "spm.model",
                 "--dict", spm_dir / "dict.txt", "--out", out, "--workers", "2",
                 "--chunk-lines", "7", "--langs", "en", "de", "zh-cn")
    assert result.returncode == 0, result.stderr
    assert folder_hashes(out) == folder_hashes(data_bin)
    assert not [p.name for p in tmp_path.iterdir() if p.name != "data-bin"], "staging left over"


# ----------------------------------------------------------------------------------------------
# Bad input: a clear message, exit code 1 or 2, no traceback, and the existing DATA untouched
# (every case passes --force, so only validating before writing keeps DATA intact).
# ----------------------------------------------------------------------------------------------
def _break_line_counts(raw: Path) -> list[str]:
    path = raw / "para" / "en-de.valid.de"
    path.write_text(path.read_text(encoding="utf-8") + "Ein Satz zu viel.\n", encoding="utf-8")
    return ["parallel files differ in line count", "en-de.valid.en has 20 lines",
            "en-de.valid.de has 21 lines"]


def _empty_language_file(raw: Path) -> list[str]:
    (raw / "mono" / "de.valid.txt").write_text("\n  \n", encoding="utf-8")
    return ["empty language file", "de.valid.txt"]


def _non_utf8(raw: Path) -> list[str]:
    path = raw / "mono" / "de.train.txt"
    lines = path.read_bytes().split(b"\n")
    lines[4] = lines[4][:3] + b"\xe4" + lines[4][3:]  # latin-1 'ä'
    path.write_bytes(b"\n".join(lines))
    return ["de.train.txt:5: not UTF-8", "0xe4"]


def _missing_partner(raw: Path) -> list[str]:
    (raw / "para" / "en-de.test.de").unlink()
    return ["parallel data en-de (test) is incomplete", "en-de.test.en", "en-de.test.de"]


def _no_raw_folder(raw: Path) -> list[str]:
    shutil.rmtree(raw)
    return ["missing RAW corpus folder", str(raw)]


@pytest.mark.parametrize("damage", [_break_line_counts, _empty_language_file, _non_utf8,
                                    _missing_partner, _no_raw_folder])
def test_bad_corpus_is_reported_and_existing_data_kept(damage, raw_copy, spm_dir, data_bin,
                                                       tmp_path, run):
    out = Path(shutil.copytree(data_bin, tmp_path / "data-bin"))
    before = folder_hashes(out)
    expected = damage(raw_copy)
    result = run("binarize.py", "--raw", raw_copy, "--spm-model", spm_dir / "spm.model",
                 "--dict", spm_dir / "dict.txt", "--out", out, "--force")
    assert result.returncode in (1, 2)
    assert "Traceback" not in result.stderr
    for part in expected:
        assert part in result.stderr
    assert folder_hashes(out) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "staging left"


def test_unknown_language_is_named_with_the_available_ones(raw_corpus, spm_dir, tmp_path, run):
    result = run("binarize.py", "--raw", raw_corpus, "--spm-model", spm_dir / "spm.model",
                 "--dict", spm_dir / "dict.txt", "--out", tmp_path / "out",
                 "--langs", "en", "fr")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "language(s) fr not found" in result.stderr
    assert "available: de, en, zh-cn" in result.stderr
    assert not (tmp_path / "out").exists()


def test_dictionary_of_another_model_is_rejected(raw_corpus, spm_dir, data_bin, tmp_path, run):
    lines = (spm_dir / "dict.txt").read_text(encoding="utf-8").split("\n")
    lines[2] = "▁Wörterbuchfremd 7"
    bad_dict = tmp_path / "dict.txt"
    bad_dict.write_text("\n".join(lines), encoding="utf-8")
    out = Path(shutil.copytree(data_bin, tmp_path / "data-bin"))
    before = folder_hashes(out)
    result = run("binarize.py", "--raw", raw_corpus, "--spm-model", spm_dir / "spm.model",
                 "--dict", bad_dict, "--out", out, "--force")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{bad_dict}:3: dictionary piece '▁Wörterbuchfremd' is not in the sentencepiece " \
           f"model" in result.stderr
    assert folder_hashes(out) == before


def test_missing_model_file_is_named(raw_corpus, spm_dir, tmp_path, run):
    result = run("binarize.py", "--raw", raw_corpus, "--spm-model", tmp_path / "nope.model",
                 "--dict", spm_dir / "dict.txt", "--out", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"missing sentencepiece model: {tmp_path / 'nope.model'}" in result.stderr


def test_existing_output_is_refused_without_force(raw_corpus, spm_dir, data_bin, tmp_path, run):
    out = Path(shutil.copytree(data_bin, tmp_path / "data-bin"))
    before = folder_hashes(out)
    result = run("binarize.py", "--raw", raw_corpus, "--spm-model", spm_dir / "spm.model",
                 "--dict", spm_dir / "dict.txt", "--out", out)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"output folder {out} already holds a binarized dataset; pass --force to replace it " \
           "(it is only replaced once the new one is complete)" in result.stderr
    assert folder_hashes(out) == before


def test_a_language_without_train_text_is_refused_like_train_spm_does(raw_copy, spm_dir, tmp_path, run):
    for name in ("mono/de.train.txt", "para/en-de.train.en", "para/en-de.train.de"):
        (raw_copy / name).unlink()
    expected = f"language de has no train text in {raw_copy} (found only {raw_copy / 'mono' / 'de.test.txt'}, "
    for script, args in (
        ("binarize.py", ["--spm-model", spm_dir / "spm.model", "--dict", spm_dir / "dict.txt"]),
        ("train_spm.py", ["--vocab-size", "300"]),
    ):
        result = run(script, "--raw", raw_copy, "--out", tmp_path / script, *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert expected in result.stderr and "leave de out with --langs" in result.stderr
        assert not (tmp_path / script).exists()


@pytest.mark.slow  # one more binarize run (fairseq import included)
def test_a_staging_folder_left_by_a_killed_run_is_removed_by_the_next_run(raw_corpus, spm_dir, tmp_path, run):
    out = tmp_path / "data-bin"
    child = subprocess.Popen([sys.executable, "-c", ""])  # a process id that is gone: a SIGKILLed run's
    child.wait()
    stale = tmp_path / f".data-bin.tmp-{child.pid}"
    (stale / "mono" / "en").mkdir(parents=True)
    (stale / "mono" / "en" / "train.bin").write_bytes(b"half")
    result = run("binarize.py", "--raw", raw_corpus, "--spm-model", spm_dir / "spm.model",
                 "--dict", spm_dir / "dict.txt", "--out", out, "--langs", "en", "de", "zh-cn")
    assert result.returncode == 0, result.stderr
    assert f"note: removed {stale}, left by an interrupted run (process {child.pid} is gone)" in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["data-bin"]


def test_help_describes_the_layout(run):
    result = run("binarize.py", "--help")
    assert result.returncode == 0
    for option in ("--raw", "--spm-model", "--dict", "--out", "--workers", "--force", "--langs"):
        assert option in result.stdout
    assert "DATA/mono/{lang}/{split}.bin" in result.stdout
