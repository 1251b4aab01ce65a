"""xmoe.tokenizer encodes text exactly as pre-training did, without fairseq."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xmoe.tokenizer import FairseqVocabulary, XMoETokenizer

from data_prep.dataprep_helpers import LANGS

pytestmark = pytest.mark.slow  # the session's tiny corpus, made by data-prep's scripts


@pytest.fixture(scope="module")
def tokenizer(pretrain_data) -> XMoETokenizer:
    _, data = pretrain_data
    return XMoETokenizer(str(data / "spm.model"), str(data / "dict.txt"), languages=list(LANGS))


def test_encode_reproduces_every_binarized_line_with_bos_in_front(tokenizer, pretrain_data):
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    raw, data = pretrain_data
    for lang in LANGS:
        lines = [line for line in (raw / "mono" / f"{lang}.test.txt").read_text(encoding="utf-8").split("\n") if line.strip()]
        binarized = MMapIndexedDataset(str(data / "mono" / lang / "test"))
        assert len(lines) == len(binarized) > 0
        for i, line in enumerate(lines):
            # binarize.py stores `ids </s>`; the task puts <s> in front of every sample
            assert tokenizer.encode(line) == [tokenizer.bos_id, *binarized[i].tolist()], (lang, i, line)


def test_vocabulary_equals_the_tasks_dictionary_with_mask(pretrain_data):
    from fairseq.data import Dictionary

    _, data = pretrain_data
    task_dictionary = Dictionary.load(str(data / "dict.txt"))
    mask_id = task_dictionary.add_symbol("<mask>")  # what xmoe_mlm_tlm and masked_lm do
    vocab = FairseqVocabulary(str(data / "dict.txt"))
    assert vocab.symbols == task_dictionary.symbols
    assert (vocab.bos, vocab.pad, vocab.eos, vocab.unk, vocab.mask) == (
        task_dictionary.bos(), task_dictionary.pad(), task_dictionary.eos(), task_dictionary.unk(), mask_id
    )


def test_overwrite_flag_and_listed_mask_follow_fairseq(tmp_path):
    from fairseq.data import Dictionary

    path = tmp_path / "dict.txt"
    path.write_text("\u2581a 5\n<s> 1 #fairseq:overwrite\nb 3\n<mask> 1\n", encoding="utf-8")
    task_dictionary = Dictionary.load(str(path))
    task_dictionary.add_symbol("<mask>")
    vocab = FairseqVocabulary(str(path))
    assert vocab.symbols == task_dictionary.symbols
    assert all(vocab.index(s) == task_dictionary.index(s) for s in ["<s>", "\u2581a", "b", "<mask>", "zzz"])


def test_bad_dictionary_line_is_named(tmp_path):
    path = tmp_path / "dict.txt"
    path.write_text("a 1\nb\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dict.txt:2: expected '<piece> <count>"):
        FairseqVocabulary(str(path))
    path.write_text("a 1\na 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dict.txt:2: 'a' is listed twice"):
        FairseqVocabulary(str(path))


def test_pair_is_two_sentences_and_cut_like_tlm_pairs(tokenizer):
    from xmoe.data.parallel_pairs import fit_pair_lengths

    a, b = "the table cell chart page style format select", "Zelle Spalte"
    body_a, body_b = tokenizer.encode(a)[1:-1], tokenizer.encode(b)[1:-1]
    eos, bos = tokenizer.eos_id, tokenizer.bos_id
    assert tokenizer.encode_pair(a, b) == [bos, *body_a, eos, *body_b, eos]

    tokenizer_short = XMoETokenizer(tokenizer.spm_model_path, tokenizer.vocab.path, max_positions=9)
    keep_a, keep_b = fit_pair_lengths(np.int64(len(body_a)), np.int64(len(body_b)), 9 - 3)
    assert tokenizer_short.encode_pair(a, b) == [bos, *body_a[:keep_a], eos, *body_b[:keep_b], eos]
    assert len(tokenizer_short.encode(a)) == 9 and tokenizer_short.encode(a)[-1] == eos


def test_batch_right_pads_with_pad_id_and_fills_language_ids(tokenizer):
    batch = tokenizer.batch(["Zelle.", "the table cell chart page"], languages=["de", "en"])
    first, second = tokenizer.encode("Zelle."), tokenizer.encode("the table cell chart page")
    assert batch.src_tokens.shape == (2, len(second))
    assert batch.src_tokens[0].tolist() == first + [tokenizer.pad_id] * (len(second) - len(first))
    assert batch.lengths.tolist() == [len(first), len(second)]
    assert torch.equal(batch.padding_mask, batch.src_tokens.eq(tokenizer.pad_id))
    assert batch.src_langs[0, : len(first)].tolist() == [LANGS.index("de")] * len(first)
    assert batch.src_langs[1].tolist() == [LANGS.index("en")] * len(second)
    assert tokenizer.batch(["a", "b"]).src_langs is None
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        tokenizer.batch(["a"], languages="xx")


def test_decode_inverts_encode_and_drops_specials(tokenizer):
    text = "Window open frame open the style insert."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode_pair("Zelle Spalte.", "der Wert.")) == "Zelle Spalte. der Wert."
    assert tokenizer.decode([tokenizer.bos_id, tokenizer.mask_id, tokenizer.pad_id]) == ""
