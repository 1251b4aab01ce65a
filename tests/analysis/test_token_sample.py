"""The fixed token samples the analyses run on, and how they are batched."""

import shutil

import pytest
import torch

from xmoe.analysis.corpus import AnalysisInputError, BinarizedCorpus, build_token_sample, sentence_inputs
from xmoe.analysis.probe import batches_by_length

BOS, PAD, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def corpus(analysis_corpus) -> BinarizedCorpus:
    return BinarizedCorpus(str(analysis_corpus))


def test_each_group_gets_the_first_n_tokens_of_its_split(corpus):
    sample = build_token_sample(corpus, "valid", ["en", "fr"], ["en-de"], tokens_per_group=50, tokens_per_sample=16)
    assert sample.group_names == ["en", "fr", "en-de"] and sample.group_kinds == ["language", "language", "pair"]
    assert sample.tokens_per_group() == {"en": 50, "fr": 50, "en-de": 50} and sample.num_tokens == 150
    assert all(len(x.tokens) <= 16 for x in sample.sequences)

    # The language stream is <s> + whole lines, in corpus order, the last sequence cut to fit.
    english = [x for x in sample.sequences if x.group == 0]
    lines = corpus.mono_lines("en", "valid")
    assert english[0].tokens[0] == BOS
    assert torch.equal(english[0].tokens[1 : 1 + len(lines[0])], lines[0].long())
    assert sum(len(x.tokens) for x in english) == 50
    assert all(torch.equal(x.langs, torch.full_like(x.tokens, 0)) for x in english)  # en = language id 0
    assert [int(x.langs[0]) for x in sample.sequences if x.group == 1] == [2] * sum(x.group == 1 for x in sample.sequences)


def test_pair_sequences_are_tlm_inputs_with_target_positions_restarting(corpus):
    sample = build_token_sample(corpus, "test", [], ["en-de"], tokens_per_group=1000, tokens_per_sample=64)
    first = sample.sequences[0]
    src_lines, tgt_lines = corpus.para_lines("en-de", "test")
    src, tgt = src_lines[0].long(), tgt_lines[0].long()  # both end with </s>
    assert torch.equal(first.tokens, torch.cat([torch.tensor([BOS]), src, tgt]))
    assert torch.equal(first.langs, torch.tensor([0] * (1 + len(src)) + [1] * len(tgt)))
    assert torch.equal(first.positions, torch.cat([torch.arange(1 + len(src)), torch.arange(len(tgt))]))


def test_the_sample_is_the_same_every_time(corpus):
    def tokens():
        sample = build_token_sample(corpus, "valid", ["de"], ["en-fr"], tokens_per_group=300, tokens_per_sample=32)
        return [x.tokens.tolist() for x in sample.sequences]

    assert tokens() == tokens()


def test_pairs_none_and_unknown_selections(corpus):
    assert corpus.select_pairs("none", "valid") == []
    assert corpus.select_pairs(None, "valid") == ["en-de", "en-fr"]
    assert corpus.select_languages(None, "valid") == ["en", "de", "fr"]
    with pytest.raises(AnalysisInputError, match="--pairs: unknown pair 'de-fr'"):
        corpus.select_pairs("de-fr", "valid")
    with pytest.raises(AnalysisInputError, match="no monolingual 'nosuch' data for 'en'"):
        corpus.select_languages("en", "nosuch")


def test_a_plain_fairseq_folder_is_one_group_without_language_ids(analysis_corpus, tmp_path):
    # fairseq-preprocess's layout, as the masked_lm task reads it: dict.txt + {split}.bin/.idx
    shutil.copy(analysis_corpus / "dict.txt", tmp_path / "dict.txt")
    for suffix in (".bin", ".idx"):
        shutil.copy(analysis_corpus / "mono" / "en" / f"valid{suffix}", tmp_path / f"valid{suffix}")
    plain = BinarizedCorpus(str(tmp_path))
    assert plain.is_plain and plain.select_languages(None, "valid") == ["all"] and plain.pairs == []
    sample = build_token_sample(plain, "valid", ["all"], [], tokens_per_group=40, tokens_per_sample=16)
    assert sample.num_tokens == 40 and all(x.langs is None for x in sample.sequences)


def test_retrieval_sentences_are_cut_to_max_positions_keeping_the_final_eos():
    lines = [torch.tensor([7, 8, 9, 10, 11, EOS]), torch.tensor([5, EOS])]
    long, short = sentence_inputs(lines, lang_id=3, bos=BOS, eos=EOS, max_positions=5)
    assert long.tokens.tolist() == [BOS, 7, 8, 9, EOS]
    assert short.tokens.tolist() == [BOS, 5, EOS]
    assert long.langs.tolist() == [3] * 5 and long.positions is None


def test_batches_hold_every_sequence_once_within_the_token_budget():
    lengths = [5, 30, 7, 12, 12, 3, 40, 8]
    batches = batches_by_length(lengths, batch_tokens=32)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 32
    assert [6] in batches  # longer than the budget: a batch of its own
