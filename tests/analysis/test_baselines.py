"""xmoe.analysis.baselines: the random-init encoder, per-language centring, piece TF-IDF."""

import math

import numpy as np
import pytest
import torch

from xmoe.analysis import retrieval_accuracy
from xmoe.analysis.baselines import PieceTfidf, centre, random_init_encoder, random_init_like, tfidf_retrieval_embeddings
from xmoe.encoder import EncoderConfig


def tiny_config() -> EncoderConfig:
    return EncoderConfig(vocab_size=40, padding_idx=1, encoder_layers=2, encoder_embed_dim=16,
                         encoder_ffn_embed_dim=32, encoder_attention_heads=2, moe_experts=4,
                         moe_layer_indices=[1], num_languages=2, max_positions=32)


def test_random_init_is_the_seeded_initialisation_and_leaves_the_global_rng_alone():
    config = tiny_config()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = random_init_encoder(config, seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # global RNG state untouched

    torch.manual_seed(0)
    from xmoe.encoder import XMoEEncoder

    reference = XMoEEncoder(config).state_dict()  # pre-training's own initialisation, seed 0
    again, other = random_init_encoder(config, seed=0).state_dict(), random_init_encoder(config, seed=1).state_dict()
    for key, value in first.state_dict().items():
        assert torch.equal(value, reference[key]) and torch.equal(value, again[key]), key
    assert not torch.equal(first.state_dict()["embed_tokens.weight"], other["embed_tokens.weight"])
    assert not first.training


def test_random_init_like_keeps_the_models_config_and_eval_capacity():
    from xmoe.encoder import XMoEEncoder

    model = XMoEEncoder(tiny_config())
    for moe in model.moe_layers():
        moe.eval_capacity_factor = 0.0
    fresh = random_init_like(model, seed=3)
    assert fresh.cfg == model.cfg
    assert [m.eval_capacity_factor for m in fresh.moe_layers()] == [0.0]
    assert torch.equal(fresh.state_dict()["embed_tokens.weight"],
                       random_init_encoder(model.cfg, 3).state_dict()["embed_tokens.weight"])


def test_language_centring_removes_an_offset_that_hides_the_translations():
    rng = np.random.default_rng(0)
    content = rng.normal(size=(20, 8))
    # Each language adds a large offset of its own: raw cosine then ranks by noise around it.
    src = content + 50 * np.eye(8)[0] + 0.01 * rng.normal(size=(20, 8))
    tgt = content + 50 * np.eye(8)[1] + 0.01 * rng.normal(size=(20, 8))
    raw = retrieval_accuracy(centre(src, "none"), centre(tgt, "none"))
    centred = retrieval_accuracy(centre(src, "language"), centre(tgt, "language"))
    assert centred["src_to_tgt"] == centred["tgt_to_src"] == 1.0
    assert raw["src_to_tgt"] < 0.5
    np.testing.assert_allclose(centre(src, "language").mean(0), 0, atol=1e-12)
    tensor = torch.tensor(src)
    assert torch.allclose(centre(tensor, "language"), torch.tensor(src - src.mean(0)))
    with pytest.raises(ValueError, match="centring must be one of"):
        centre(src, "global")


def test_piece_tfidf_weights_counts_by_smoothed_idf_and_normalises():
    documents = [[5, 5, 7], [7, 9], [9, 9, 9]]
    tfidf = PieceTfidf().fit(documents)
    vectors = tfidf.transform([[5, 5, 7], [11]]).toarray()
    idf = {5: math.log(4 / 2) + 1, 7: math.log(4 / 3) + 1, 9: math.log(4 / 3) + 1}  # ln((1+n)/(1+df)) + 1
    raw = np.array([2 * idf[5], idf[7], 0.0])  # columns: pieces 5, 7, 9 (sorted ids)
    np.testing.assert_allclose(vectors[0], raw / np.linalg.norm(raw))
    np.testing.assert_allclose(vectors[1], 0)  # piece 11 was never seen


def test_tfidf_retrieval_finds_translations_that_share_pieces():
    src = [[10, 11, 12], [20, 21, 22], [30, 31, 32]]
    tgt = [[10, 40, 41], [42, 21, 43], [44, 45, 32]]  # one shared piece each
    src_V, tgt_V = tfidf_retrieval_embeddings(src, tgt, "none")
    assert retrieval_accuracy(src_V, tgt_V) == {"src_to_tgt": 1.0, "tgt_to_src": 1.0, "num_pairs": 3}
    centred_src, _ = tfidf_retrieval_embeddings(src, tgt, "language")
    np.testing.assert_allclose(centred_src.mean(0), 0, atol=1e-12)
