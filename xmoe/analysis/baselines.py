"""Baselines that every cross-lingual quality number of a trained encoder is reported beside.

- The same architecture at random initialisation (`random_init_like`): the same config and the
  same initialisation code as pre-training starts from, drawn with a fixed seed. A pre-trained
  model that does not beat it has learnt nothing that transfers.
- A bag of the same sentencepiece pieces, TF-IDF weighted (`PieceTfidf`): what shared pieces
  (numbers, names, cognates, code) give across languages without any model.

and the optional embedding post-processing they are compared under:

- per-language mean-centring (`centre`): subtract from every sentence embedding the mean
  embedding of its language's sentences (Libovicky et al. 2020, "On the language neutrality of
  pre-trained multilingual representations"). Mean-pooled states of a Transformer share a
  large common component (anisotropy) and a per-language offset; cosine similarity then
  mostly measures those, and centring removes them with no labels and no training.

Shape legend: N = sentences, C = model dim, V = vocabulary (pieces).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

CENTRINGS = ("language", "none")
DEFAULT_CENTRING = "language"
RETRIEVAL_BASELINES = ("random_init", "tfidf")
DEFAULT_RANDOM_INIT_SEED = 0


def random_init_encoder(config, seed: int = DEFAULT_RANDOM_INIT_SEED):
    """A new XMoEEncoder for EncoderConfig `config`, initialised as pre-training initialises
    it, from torch seed `seed` (the global RNG state is left as it was), in eval mode."""
    from xmoe.encoder import XMoEEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return XMoEEncoder(config).eval()


def random_init_like(encoder, seed: int = DEFAULT_RANDOM_INIT_SEED):
    """random_init_encoder of `encoder`'s config, with the same evaluation capacity factor in
    every MoE layer as `encoder`."""
    fresh = random_init_encoder(encoder.cfg, seed)
    for new_moe, old_moe in zip(fresh.moe_layers(), encoder.moe_layers()):
        new_moe.eval_capacity_factor = old_moe.eval_capacity_factor
    return fresh


def centre(embeddings_ND, centring: str):
    """`embeddings_ND` minus their mean row (centring="language": call it once per language,
    on that language's sentences) or unchanged ("none"). Dense tensors and arrays."""
    if centring not in CENTRINGS:
        raise ValueError(f"centring must be one of {CENTRINGS}, got {centring!r}")
    if centring == "none":
        return embeddings_ND
    keep_dims = {"keepdims": True} if isinstance(embeddings_ND, np.ndarray) else {"keepdim": True}
    return embeddings_ND - embeddings_ND.mean(0, **keep_dims)


def _pieces(ids: Sequence[int]) -> Sequence[int]:
    return ids  # the documents are lists of piece ids already: nothing left to tokenize


class PieceTfidf:
    """TF-IDF vectors of documents given as lists of sentencepiece (dictionary) ids.

    scikit-learn's TfidfVectorizer on the ids: raw counts times the smoothed inverse document
    frequency idf(p) = ln((1 + n) / (1 + df(p))) + 1 learnt on the `fit` documents, each vector
    L2-normalised. Pieces never seen in `fit` are ignored.
    """

    def __init__(self) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(analyzer=_pieces, lowercase=False)

    def fit(self, documents: Sequence[Sequence[int]]) -> "PieceTfidf":
        self.vectorizer.fit([list(map(int, d)) for d in documents])
        return self

    def transform(self, documents: Sequence[Sequence[int]]):
        """(N, V) scipy sparse matrix."""
        return self.vectorizer.transform([list(map(int, d)) for d in documents])


def tfidf_retrieval_embeddings(
    src_documents: Sequence[Sequence[int]], tgt_documents: Sequence[Sequence[int]], centring: str
) -> tuple[np.ndarray, np.ndarray]:
    """Dense (N, V) TF-IDF vectors of both sides of a pair, the IDF learnt on both sides
    together (the sentences being evaluated; no other text), each side centred per `centring`."""
    tfidf = PieceTfidf().fit(list(src_documents) + list(tgt_documents))
    src_NV = tfidf.transform(src_documents).toarray()
    tgt_NV = tfidf.transform(tgt_documents).toarray()
    return centre(src_NV, centring), centre(tgt_NV, centring)
