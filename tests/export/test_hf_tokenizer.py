"""The export's standard tokenizer (tokenizer.json, a PreTrainedTokenizerFast) gives exactly the
ids pre-training gave: on every held-out line data-prep binarized (Latin, CJK), on Cyrillic and
Japanese held-out lines with a BPE model, on pairs, around `<mask>`, with pieces dict.txt lacks; and it
round-trips through save_pretrained / from_pretrained."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from xmoe.tokenizer import XMoETokenizer

from data_prep.dataprep_helpers import LANGS, make_sentence, run_script

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # the session's tiny corpus, made by data-prep's scripts

RU_WORDS = ("документ таблица ячейка диаграмма страница стиль формат выбрать открыть сохранить вставить "
            "текст поле значение столбец строка лист данные список меню окно файл имя число").split()
JA_CHARS = "ドキュメントの表セルを選択して開く保存挿入テキスト値列行シートデータ一覧メニュー窓名前数画像印刷表示編集"


def held_out_lines(raw: Path, lang: str) -> list[str]:
    return [line for line in (raw / "mono" / f"{lang}.test.txt").read_text(encoding="utf-8").split("\n") if line.strip()]


def binarized_rows(data: Path, lang: str) -> list[list[int]]:
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    rows = MMapIndexedDataset(str(data / "mono" / lang / "test"))
    return [rows[i].tolist() for i in range(len(rows))]


def assert_encodes_like_binarize(tokenizer, raw: Path, data: Path, langs) -> None:
    for lang in langs:
        lines, rows = held_out_lines(raw, lang), binarized_rows(data, lang)
        assert len(lines) == len(rows) > 0
        for line, row in zip(lines, rows):
            # binarize.py stores `ids </s>`; the task puts <s> in front of every sample
            assert tokenizer(line)["input_ids"] == [0, *row], (lang, line)


@pytest.fixture(scope="module")
def fast_tokenizer(pretrained):
    return transformers.AutoTokenizer.from_pretrained(str(pretrained.exported), trust_remote_code=True)


def test_auto_tokenizer_is_a_standard_fast_tokenizer_with_the_specials_set(fast_tokenizer, pretrained):
    import json

    assert isinstance(fast_tokenizer, transformers.PreTrainedTokenizerFast)
    config = json.loads((pretrained.exported / "config.json").read_text())
    vocab = XMoETokenizer(str(pretrained.data / "spm.model"), str(pretrained.data / "dict.txt")).vocab
    assert len(fast_tokenizer) == config["vocab_size"] == len(vocab)
    specials = {name: getattr(fast_tokenizer, f"{name}_token_id") for name in ("bos", "cls", "pad", "eos", "sep", "unk", "mask")}
    assert specials == {"bos": 0, "cls": 0, "pad": 1, "eos": 2, "sep": 2, "unk": 3, "mask": vocab.mask}
    assert fast_tokenizer.mask_token == "<mask>" and fast_tokenizer.model_max_length == config["max_positions"]
    assert fast_tokenizer.convert_ids_to_tokens(list(range(4, 10))) == vocab.symbols[4:10]


def test_ids_equal_the_binarized_held_out_lines_of_every_language(fast_tokenizer, pretrain_data):
    raw, data = pretrain_data
    assert_encodes_like_binarize(fast_tokenizer, raw, data, LANGS)  # zh-cn: CJK without spaces


def test_bpe_model_on_cyrillic_and_japanese_encodes_like_pretraining(tmp_path):
    from xmoe.hf.tokenization import build_fast_tokenizer

    rng = random.Random(0)
    raw = tmp_path / "raw"
    (raw / "mono").mkdir(parents=True)
    makers = {
        "en": lambda: make_sentence("en", rng),
        "ru": lambda: " ".join(rng.choice(RU_WORDS) for _ in range(rng.randint(3, 10))).capitalize() + ".",
        "ja": lambda: "".join(rng.choice(JA_CHARS) for _ in range(rng.randint(5, 15))) + "。",
    }
    for lang, make in makers.items():
        for split, count in (("train", 200), ("valid", 5), ("test", 40)):
            lines = [make() for _ in range(count)]
            if split == "test":  # spaces and characters the model never saw: <unk>, as in pre-training
                lines += ["  Двойные  пробелы   и  Ωμέγα ✓  ", "混合 text и текст 表"]
            (raw / "mono" / f"{lang}.{split}.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    spm = run_script("train_spm.py", "--raw", raw, "--out", tmp_path / "spm", "--vocab-size", "200",
                     "--model-type", "bpe", "--sentences-per-language", "200", "--threads", "1")
    assert spm.returncode == 0, spm.stderr
    spm_model, dictionary = str(tmp_path / "spm" / "spm.model"), str(tmp_path / "spm" / "dict.txt")
    tokenizer = build_fast_tokenizer(spm_model, dictionary)
    # xmoe.tokenizer is checked against binarize.py's output line by line in test_tokenizer.py
    reference = XMoETokenizer(spm_model, dictionary)
    unknown = 0
    for lang in makers:
        for line in held_out_lines(raw, lang):
            assert tokenizer(line)["input_ids"] == reference.encode(line), (lang, line)
            unknown += reference.encode(line).count(reference.vocab.unk)
    assert unknown > 0  # the unseen characters


def test_pairs_are_two_sentences_of_a_block_like_tlm_pairs_and_xmoe_finetune(fast_tokenizer, pretrain_data):
    raw, data = pretrain_data
    en, de = binarized_rows(data, "en"), binarized_rows(data, "de")
    en_lines, de_lines = held_out_lines(raw, "en"), held_out_lines(raw, "de")
    reference = XMoETokenizer(str(data / "spm.model"), str(data / "dict.txt"))
    for i in range(10):
        ids = fast_tokenizer(en_lines[i], de_lines[i])["input_ids"]
        assert ids == [0, *en[i], *de[i]]  # `<s> a </s> b </s>`, the task's TLM token layout
        assert ids == reference.encode_pair(en_lines[i], de_lines[i])  # what xmoe-finetune feeds


def test_pair_truncation_differs_from_pretraining_only_in_an_odd_tie_with_the_longer_text_first(fast_tokenizer, pretrain_data):
    # Pre-training cuts a long pair to `budget` tokens keeping a short side whole and otherwise
    # about half each, the odd token going to the second text; transformers' longest_first
    # gives it to the longer text. Everything else about the cut is the same.
    _, data = pretrain_data
    rng = random.Random(3)
    for _ in range(60):
        a = " ".join(make_sentence("en", rng) for _ in range(rng.randint(1, 3)))
        b = " ".join(make_sentence("de", rng) for _ in range(rng.randint(1, 3)))
        max_length = rng.randint(6, 40)
        reference = XMoETokenizer(str(data / "spm.model"), str(data / "dict.txt"), max_positions=max_length)
        got = fast_tokenizer(a, b, truncation=True, max_length=max_length)["input_ids"]
        expected = reference.encode_pair(a, b)
        budget, len_a, len_b = max_length - 3, len(reference.encode_body(a)), len(reference.encode_body(b))
        odd_tie_with_longer_first = budget % 2 == 1 and min(len_a, len_b) > budget // 2 and len_a > len_b
        if not odd_tie_with_longer_first:
            assert got == expected
        else:
            first_end = expected.index(2)
            assert got == [*expected[:first_end], reference.encode_body(a)[first_end - 1], 2, *expected[first_end + 1 : -2], 2]
        assert fast_tokenizer(a, truncation=True, max_length=max_length)["input_ids"] == reference.encode(a)


def test_mask_in_text_stands_for_the_piece_of_the_word_it_replaces(fast_tokenizer, pretrain_data):
    _, data = pretrain_data
    reference = XMoETokenizer(str(data / "spm.model"), str(data / "dict.txt"))
    words = "Zelle Tabelle Wert Spalte Daten".split()
    full = reference.encode(" ".join(words) + ".")
    single_piece = [k for k, w in enumerate(words) if len(reference.encode_body((" " if k else "") + w)) == 1]
    assert single_piece
    for k in single_piece:  # the word's piece (with its space) becomes <mask>; "." after it stays "."
        text = " ".join(words[:k] + ["<mask>"] + words[k + 1 :]) + "."
        assert fast_tokenizer(text)["input_ids"] == full[: k + 1] + [fast_tokenizer.mask_token_id] + full[k + 2 :]


def test_pieces_missing_from_the_dictionary_get_ids_past_it_where_pretraining_had_unk(pretrain_data, tmp_path):
    from xmoe.hf.tokenization import build_fast_tokenizer

    raw, data = pretrain_data
    lines = (data / "dict.txt").read_text(encoding="utf-8").splitlines()
    dropped = {lines[i].split(" ")[0] for i in (5, 17, 40)}
    (tmp_path / "dict.txt").write_text("\n".join(l for i, l in enumerate(lines) if i not in (5, 17, 40)) + "\n")
    reference = XMoETokenizer(str(data / "spm.model"), str(tmp_path / "dict.txt"))
    tokenizer = build_fast_tokenizer(str(data / "spm.model"), str(tmp_path / "dict.txt"))
    assert len(tokenizer) == len(reference) + 3
    assert set(tokenizer.convert_ids_to_tokens(list(range(len(reference), len(reference) + 3)))) == dropped
    seen_missing = 0
    for line in held_out_lines(raw, "en") + held_out_lines(raw, "de"):
        ids = tokenizer(line)["input_ids"]
        seen_missing += sum(i >= len(reference) for i in ids)
        assert [3 if i >= len(reference) else i for i in ids] == reference.encode(line)
    assert seen_missing > 0


def test_save_and_load_round_trip(fast_tokenizer, pretrain_data, tmp_path):
    raw, _ = pretrain_data
    fast_tokenizer.save_pretrained(str(tmp_path))
    reloaded = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    lines = held_out_lines(raw, "zh-cn")[:5] + held_out_lines(raw, "de")[:5]
    assert reloaded(lines)["input_ids"] == fast_tokenizer(lines)["input_ids"]
    assert reloaded(lines[0], lines[1])["input_ids"] == fast_tokenizer(lines[0], lines[1])["input_ids"]
    assert reloaded.all_special_ids == fast_tokenizer.all_special_ids
    assert (reloaded.mask_token_id, reloaded.pad_token_id) == (fast_tokenizer.mask_token_id, 1)
    assert reloaded("a <mask>.")["input_ids"] == fast_tokenizer("a <mask>.")["input_ids"]
