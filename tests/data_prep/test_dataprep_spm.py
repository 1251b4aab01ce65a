"""train_spm.py: a sentencepiece model + fairseq dict.txt from RAW, or checking an existing pair."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import sentencepiece as spm

from .dataprep_helpers import folder_hashes


def _dict_pieces(path: Path) -> list[str]:
    return [line.rsplit(" ", 1)[0] for line in path.read_text(encoding="utf-8").splitlines()]


def test_dict_lists_every_ordinary_piece_in_model_order(spm_dir):
    processor = spm.SentencePieceProcessor(model_file=str(spm_dir / "spm.model"))
    assert processor.get_piece_size() == 300
    ordinary = [processor.id_to_piece(i) for i in range(processor.get_piece_size())
                if not (processor.is_control(i) or processor.is_unknown(i))]
    assert _dict_pieces(spm_dir / "dict.txt") == ordinary
    assert not {"<unk>", "<s>", "</s>", "<pad>"} & set(ordinary)
    counts = [int(line.rsplit(" ", 1)[1])
              for line in (spm_dir / "dict.txt").read_text(encoding="utf-8").splitlines()]
    assert sum(counts) > 0 and min(counts) >= 0
    # Chinese characters made it into the vocabulary (character_coverage keeps common CJK)
    assert any("\u4e00" <= ch <= "\u9fff" for piece in ordinary for ch in piece)


def test_default_sampling_gives_every_language_the_same_number_of_lines(spm_dir):
    info = json.loads((spm_dir / "spm_info.json").read_text())
    assert info["languages"] == ["en", "de", "zh-cn"]
    assert info["sampled_lines"] == {"en": 200, "de": 200, "zh-cn": 200}
    # en has mono train + both pairs' English sides; the distinct count shows they were pooled
    assert info["distinct_train_lines"]["en"] > info["distinct_train_lines"]["de"]


def test_alpha_one_samples_in_proportion_to_the_data(raw_copy, tmp_path, run):
    # make German twice as large as it was, so shares must differ
    de = raw_copy / "mono" / "de.train.txt"
    de.write_text(de.read_text(encoding="utf-8") + "".join(
        f"Zusätzliche Zeile Nummer {i}.\n" for i in range(450)), encoding="utf-8")
    result = run("train_spm.py", "--raw", raw_copy, "--out", tmp_path / "spm", "--vocab-size",
                 "300", "--sentences-per-language", "100", "--sampling-alpha", "1")
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "spm" / "spm_info.json").read_text())
    distinct = info["distinct_train_lines"]
    total = sum(distinct.values())
    for lang, n in info["sampled_lines"].items():
        assert n == round(300 * distinct[lang] / total)


def test_existing_model_and_dictionary_are_checked_and_copied(spm_dir, tmp_path, run):
    result = run("train_spm.py", "--spm-model", spm_dir / "spm.model", "--dict",
                 spm_dir / "dict.txt", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "ok: all 297 entries" in result.stdout
    assert (tmp_path / "out" / "dict.txt").read_bytes() == (spm_dir / "dict.txt").read_bytes()
    assert (tmp_path / "out" / "spm.model").read_bytes() == (spm_dir / "spm.model").read_bytes()


def test_dictionary_of_another_model_names_file_line_and_piece(spm_dir, tmp_path, run):
    lines = (spm_dir / "dict.txt").read_text(encoding="utf-8").splitlines()
    lines.insert(4, "▁nichtimmodell 12")
    bad = tmp_path / "dict.txt"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run("train_spm.py", "--spm-model", spm_dir / "spm.model", "--dict", bad)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{bad}:5: dictionary piece '▁nichtimmodell' is not in the sentencepiece model" \
        in result.stderr


def test_malformed_dictionary_line_is_named(spm_dir, tmp_path, run):
    bad = tmp_path / "dict.txt"
    bad.write_text("▁the 10\n▁a many\n", encoding="utf-8")
    result = run("train_spm.py", "--spm-model", spm_dir / "spm.model", "--dict", bad)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{bad}:2: expected '<piece> <count>'" in result.stderr


def test_too_large_vocabulary_is_a_clear_error(raw_corpus, tmp_path, run):
    result = run("train_spm.py", "--raw", raw_corpus, "--out", tmp_path / "spm",
                 "--vocab-size", "50000", "--sentences-per-language", "50")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train_spm.py: error: --vocab-size 50000 is too large: this training text yields at most " \
        in result.stderr
    assert "INTERNAL" not in result.stderr and ".cc(" not in result.stderr
    assert not (tmp_path / "spm").exists()
    assert list(tmp_path.iterdir()) == [], "a staging folder was left behind"


def test_too_small_vocabulary_names_this_tools_options(raw_corpus, tmp_path, run):
    result = run("train_spm.py", "--raw", raw_corpus, "--out", tmp_path / "spm", "--vocab-size", "20",
                 "--character-coverage", "1.0", "--sentences-per-language", "50")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--vocab-size 20 is too small: the " in result.stderr
    assert "kept by --character-coverage 1.0 each need a piece" in result.stderr
    assert "character_coverage" not in result.stderr and "INTERNAL" not in result.stderr
    assert not (tmp_path / "spm").exists()


def test_existing_output_is_refused_without_force(raw_corpus, spm_dir, tmp_path, run):
    out = Path(shutil.copytree(spm_dir, tmp_path / "spm"))
    before = folder_hashes(out)
    result = run("train_spm.py", "--raw", raw_corpus, "--out", out, "--vocab-size", "300")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"output folder {out} already holds a sentencepiece model; pass --force to replace it " \
           "(it is only replaced once the new one is complete)" in result.stderr
    assert folder_hashes(out) == before


def test_non_utf8_training_text_names_file_and_line(raw_copy, tmp_path, run):
    path = raw_copy / "mono" / "zh-cn.train.txt"
    lines = path.read_bytes().split(b"\n")
    lines[6] = lines[6][:6] + b"\xff" + lines[6][6:]
    path.write_bytes(b"\n".join(lines))
    result = run("train_spm.py", "--raw", raw_copy, "--out", tmp_path / "spm")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{path}:7: not UTF-8 (byte 0xff" in result.stderr


def test_help_explains_sampling_and_existing_models(run):
    result = run("train_spm.py", "--help")
    assert result.returncode == 0
    for option in ("--vocab-size", "--sampling-alpha", "--sentences-per-language",
                   "--character-coverage", "--spm-model", "--dict"):
        assert option in result.stdout
