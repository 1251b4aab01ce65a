"""`xmoe-analyze retrieval`: cross-lingual sentence retrieval on the held-out pairs."""

import json

import pytest
import torch

from xmoe.analysis import retrieval_accuracy
from xmoe.analysis.cli import main
from xmoe.analysis.baselines import centre, random_init_like, tfidf_retrieval_embeddings
from xmoe.analysis.corpus import BinarizedCorpus, sentence_inputs
from xmoe.retrieval import default_retrieval_layer, sentence_embeddings

from .conftest import PAIRS, PARA_LINES

pytestmark = pytest.mark.slow  # the shared fixture trains a model with fairseq-train once


def run_retrieval(checkpoint, corpus, out, *options) -> dict:
    assert main(["retrieval", str(checkpoint), "--data", str(corpus), "--out", str(out), *options]) == 0
    return json.loads((out / "retrieval.json").read_text())


def embed_one_by_one(encoder, lines, lang_id: int, layer: int) -> torch.Tensor:
    """Each sentence alone, `<s> tokens </s>`, no padding anywhere: (N, C)."""
    rows = []
    with torch.no_grad():
        for line in lines:
            tokens = torch.cat([torch.tensor([0]), line.long()])  # <s> = 0; the line ends with </s>
            _, extra = encoder(tokens[None], src_langs=torch.full_like(tokens, lang_id)[None],
                               features_only=True, return_all_hiddens=True)
            rows.append(extra["inner_states"][layer][:, 0].mean(dim=0))  # (T, C) -> (C,)
    return torch.stack(rows)


def test_retrieval_accuracy_per_pair_and_its_baselines_match_a_direct_computation(
        trained_run, analysis_corpus, tmp_path, capsys):
    from xmoe.checkpoint import load_encoder

    result = run_retrieval(trained_run.last, analysis_corpus, tmp_path)
    assert result["layer"] == default_retrieval_layer(4) == 3 and result["num_layers"] == 4
    assert result["centring"] == "language"  # the default
    assert sorted(result["pairs"]) == sorted(PAIRS)
    assert sorted(result["baselines"]) == ["random_init", "tfidf"] and result["baselines"]["random_init"]["seed"] == 0

    encoder, _, _ = load_encoder(str(trained_run.last))
    for moe in encoder.moe_layers():
        moe.eval_capacity_factor = 0.0  # dropless, as the CLI runs by default
    untrained = random_init_like(encoder, seed=0)
    corpus = BinarizedCorpus(str(analysis_corpus))
    keys = ("src_to_tgt", "tgt_to_src", "num_pairs")
    for pair, scores in result["pairs"].items():
        src, tgt = pair.split("-")
        assert (scores["src"], scores["tgt"], scores["num_pairs"]) == (src, tgt, PARA_LINES["test"])
        src_lines, tgt_lines = corpus.para_lines(pair, "test")
        for name, model in (("model", encoder), ("random_init", untrained)):
            direct = retrieval_accuracy(  # each language's mean embedding subtracted
                centre(embed_one_by_one(model, src_lines, corpus.language_id(src), layer=3), "language"),
                centre(embed_one_by_one(model, tgt_lines, corpus.language_id(tgt), layer=3), "language"),
            )
            reported = scores if name == "model" else result["baselines"][name]["pairs"][pair]
            assert direct == {key: reported[key] for key in keys}, name
        bodies = [[line[:-1].tolist() for line in lines] for lines in (src_lines, tgt_lines)]  # </s> left out
        direct = retrieval_accuracy(*tfidf_retrieval_embeddings(*bodies, "language"))
        assert direct == {key: result["baselines"]["tfidf"]["pairs"][pair][key] for key in keys}
    # the "translations" share about 2/3 of their tokens: a bag of pieces finds most of them
    assert result["baselines"]["tfidf"]["average"]["src_to_tgt"] > 0.8

    table = capsys.readouterr().out
    assert "per-language mean-centred" in table and "random init" in table and "TF-IDF pieces" in table
    en_de = next(line for line in table.splitlines() if line.startswith("en-de"))
    tfidf_cell = f"{100 * result['baselines']['tfidf']['pairs']['en-de']['src_to_tgt']:.1f}%"
    assert en_de.split()[1:3] == [str(PARA_LINES["test"]), f"{100 * result['pairs']['en-de']['src_to_tgt']:.1f}%"]
    assert en_de.split()[6] == tfidf_cell


def test_retrieval_of_noisy_copies_beats_chance_at_the_embedding_layer(trained_run, analysis_corpus, tmp_path):
    # The test "translations" share about 2/3 of their tokens with the source, so pooled token
    # embeddings (layer 0) find them well above chance (1/30), though far from always: what all
    # sentences share (position and language embeddings) dominates their mean vectors.
    result = run_retrieval(trained_run.last, analysis_corpus, tmp_path, "--layer", "0", "--pairs", "en-de")
    assert list(result["pairs"]) == ["en-de"] and result["layer"] == 0
    assert result["pairs"]["en-de"]["src_to_tgt"] > 3 / 30 and result["pairs"]["en-de"]["tgt_to_src"] > 3 / 30


def test_the_same_sentences_on_both_sides_retrieve_each_other(trained_run, analysis_corpus):
    from xmoe.checkpoint import load_encoder

    encoder, _, _ = load_encoder(str(trained_run.last))
    corpus = BinarizedCorpus(str(analysis_corpus))
    src_lines, _ = corpus.para_lines("en-de", "test")
    d = corpus.dictionary
    sentences = sentence_inputs(src_lines, corpus.language_id("en"), d.bos(), d.eos(), max_positions=512)
    embeddings = sentence_embeddings(encoder, sentences, layer=3, batch_tokens=64, device=torch.device("cpu"))
    assert retrieval_accuracy(embeddings, embeddings.clone()) == {
        "src_to_tgt": 1.0, "tgt_to_src": 1.0, "num_pairs": PARA_LINES["test"]
    }


def test_retrieval_runs_on_a_dense_model_and_caps_sentences(dense_checkpoint, analysis_corpus, tmp_path):
    result = run_retrieval(dense_checkpoint, analysis_corpus, tmp_path, "--max-sentences", "10", "--layer", "4",
                           "--centring", "none", "--baselines", "none")
    assert [r["num_pairs"] for r in result["pairs"].values()] == [10, 10]
    assert result["centring"] == "none" and result["baselines"] == {}
    assert all(0.0 <= r[d] <= 1.0 for r in result["pairs"].values() for d in ("src_to_tgt", "tgt_to_src"))
