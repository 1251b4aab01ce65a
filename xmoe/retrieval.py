"""Cross-lingual sentence retrieval (Tatoeba/BUCC-style, as in XTREME) on held-out parallel pairs.

For each language pair src-tgt of the corpus (e.g. en-de) and its held-out split:
    1. every sentence is encoded on its own as `<s> tokens </s>` (with its language id when the
       model has language embeddings), cut to the model's positions;
    2. its embedding is the mean of the hidden states of one layer over all its positions,
       <s> and </s> included (padding excluded);
    3. with centring="language" (the default), the mean embedding of each side (one language's
       evaluated sentences) is subtracted from that side's embeddings (xmoe.analysis.baselines);
    4. each src sentence retrieves the tgt sentence of highest cosine similarity, and vice versa;
       a retrieval is correct when it finds the sentence's own translation (line i <-> line i).
Accuracy is reported per pair in both directions (xmoe.analysis.retrieval_accuracy), for the
model and, on the same sentences, for its baselines: the same config at random initialisation
(same layer, pooling and centring) and TF-IDF vectors of the same pieces.

Layer numbering follows XMoEEncoder's inner_states: 0 = the embeddings, k = the output of the
k-th Transformer layer (1-based), L = the last layer. The default is L // 2 + 1, a middle layer:
XTREME's retrieval baselines pool layer 7 of the 12-layer mBERT and layer 13 of the 24-layer
XLM-R large (middle layers retrieve better than the last one, which the MLM head specialises).

Shape legend: N = sentences, T = positions, C = model dim.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from xmoe.analysis.baselines import (
    CENTRINGS,
    DEFAULT_CENTRING,
    DEFAULT_RANDOM_INIT_SEED,
    RETRIEVAL_BASELINES,
    centre,
    random_init_like,
    tfidf_retrieval_embeddings,
)
from xmoe.analysis.corpus import AnalysisInputError, BinarizedCorpus, EncoderInput, sentence_inputs
from xmoe.analysis.metrics import mean_pool, retrieval_accuracy
from xmoe.analysis.probe import AnalysedCheckpoint, forward_batches


def default_retrieval_layer(num_layers: int) -> int:
    """L // 2 + 1 (7 of 12, 13 of 24: XTREME's layers), never past the last layer."""
    return min(num_layers, num_layers // 2 + 1)


def sentence_embeddings(
    encoder,
    sentences: Sequence[EncoderInput],
    layer: int,
    batch_tokens: int,
    device: torch.device,
) -> torch.Tensor:
    """(N, C) float32 CPU tensor: mean over the positions of each sentence of inner_states[layer]."""
    num_layers = len(encoder.layers)
    if not 0 <= layer <= num_layers:
        raise AnalysisInputError(f"--layer {layer} out of range: 0 (embeddings) .. {num_layers} (last layer)")
    embeddings_ND = torch.zeros(len(sentences), encoder.cfg.encoder_embed_dim)
    for batch, extra, _ in forward_batches(encoder, sentences, batch_tokens, device, return_all_hiddens=True):
        hidden_BTC = extra["inner_states"][layer].transpose(0, 1)  # (T, B, C) -> (B, T, C)
        pooled_BC = mean_pool(hidden_BTC, batch.padding_mask)
        embeddings_ND[batch.indices] = pooled_BC.float().cpu()
    return embeddings_ND


def pair_sentences(corpus: BinarizedCorpus, pair: str, split: str, max_positions: int, use_langs: bool,
                   max_sentences: Optional[int]) -> tuple[list[EncoderInput], list[EncoderInput]]:
    """The model inputs of both sides of a pair's first max_sentences sentence pairs."""
    src, tgt = corpus.split_pair(pair)
    d = corpus.dictionary
    sides = []
    for lines, lang in zip(corpus.para_lines(pair, split), (src, tgt)):
        lang_id = corpus.language_id(lang) if use_langs else None
        sides.append(sentence_inputs(lines, lang_id, d.bos(), d.eos(), max_positions, limit=max_sentences))
    return sides[0], sides[1]


def encoder_retrieval(encoder, src_inputs, tgt_inputs, layer: int, centring: str, batch_tokens: int,
                      device: torch.device) -> dict[str, Any]:
    """retrieval_accuracy of one encoder's pooled `layer` states, each side centred per `centring`."""
    src_ND = sentence_embeddings(encoder, src_inputs, layer, batch_tokens, device)
    tgt_ND = sentence_embeddings(encoder, tgt_inputs, layer, batch_tokens, device)
    return retrieval_accuracy(centre(src_ND, centring), centre(tgt_ND, centring))


def tfidf_retrieval(src_inputs, tgt_inputs, centring: str) -> dict[str, Any]:
    """retrieval_accuracy of TF-IDF vectors of the very pieces the model reads (<s>, </s> left out)."""
    def bodies(inputs):
        return [x.tokens[1:-1].tolist() for x in inputs]

    src_NV, tgt_NV = tfidf_retrieval_embeddings(bodies(src_inputs), bodies(tgt_inputs), centring)
    return retrieval_accuracy(src_NV, tgt_NV)


def _average(pairs: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {direction: float(np.mean([r[direction] for r in pairs.values()])) for direction in ("src_to_tgt", "tgt_to_src")}


def evaluate_retrieval(
    checkpoint: AnalysedCheckpoint,
    corpus: BinarizedCorpus,
    pairs: Sequence[str],
    split: str = "test",
    layer: Optional[int] = None,
    max_positions: Optional[int] = None,
    batch_tokens: int = 8192,
    device: torch.device = torch.device("cpu"),
    max_sentences: Optional[int] = None,
    progress: Optional[Callable[[str], None]] = None,
    centring: str = DEFAULT_CENTRING,
    baselines: Sequence[str] = RETRIEVAL_BASELINES,
    random_init_seed: int = DEFAULT_RANDOM_INIT_SEED,
) -> dict[str, Any]:
    """Retrieval accuracy of every pair in `pairs` (see the module doc), as a JSON-ready dict:
    the model's under "pairs" and "average", each baseline's under "baselines"."""
    num_layers = len(checkpoint.encoder.layers)
    layer = default_retrieval_layer(num_layers) if layer is None else layer
    model_positions = checkpoint.config.max_positions
    max_positions = model_positions if max_positions is None else min(max_positions, model_positions)
    if not pairs:
        raise AnalysisInputError(f"no parallel pair with {split!r} data in {corpus.root}")
    if centring not in CENTRINGS:
        raise AnalysisInputError(f"--centring must be one of {', '.join(CENTRINGS)}, got {centring!r}")
    unknown = [b for b in baselines if b not in RETRIEVAL_BASELINES]
    if unknown:
        raise AnalysisInputError(f"unknown baseline(s) {unknown}; choose from {', '.join(RETRIEVAL_BASELINES)}")
    encoders = {"model": checkpoint.encoder}
    if "random_init" in baselines:
        encoders["random_init"] = random_init_like(checkpoint.encoder, random_init_seed)
    use_langs = checkpoint.encoder.embed_languages is not None and not corpus.is_plain
    results: dict[str, dict[str, Any]] = {name: {} for name in [*encoders, *(b for b in baselines if b == "tfidf")]}
    for pair in pairs:
        started = time.perf_counter()
        src, tgt = corpus.split_pair(pair)
        src_inputs, tgt_inputs = pair_sentences(corpus, pair, split, max_positions, use_langs, max_sentences)
        for name, encoder in encoders.items():
            accuracy = encoder_retrieval(encoder, src_inputs, tgt_inputs, layer, centring, batch_tokens, device)
            results[name][pair] = {"src": src, "tgt": tgt, **accuracy}
        if "tfidf" in results:
            results["tfidf"][pair] = {"src": src, "tgt": tgt, **tfidf_retrieval(src_inputs, tgt_inputs, centring)}
        if progress:
            cells = ", ".join(
                f"{name} {r[pair]['src_to_tgt']:.3f}/{r[pair]['tgt_to_src']:.3f}" for name, r in results.items()
            )
            progress(f"{pair}: {len(src_inputs)} pairs, {src}->{tgt}/{tgt}->{src}: {cells} "
                     f"({time.perf_counter() - started:.1f} s)")
    model_results = results.pop("model")
    described_baselines: dict[str, Any] = {}
    if "random_init" in results:
        described_baselines["random_init"] = {
            "description": f"the same config at random initialisation (torch seed {random_init_seed}), "
                           "same layer, pooling and centring",
            "seed": random_init_seed, "layer": layer,
            "pairs": results["random_init"], "average": _average(results["random_init"]),
        }
    if "tfidf" in results:
        described_baselines["tfidf"] = {
            "description": "TF-IDF over the same sentencepiece pieces (IDF from the evaluated sentences "
                           "of the pair, both sides), cosine, same centring",
            "pairs": results["tfidf"], "average": _average(results["tfidf"]),
        }
    return {
        "command": "retrieval",
        "checkpoint": checkpoint.describe(),
        "data": corpus.root,
        "split": split,
        "layer": layer,
        "num_layers": num_layers,
        "max_positions": max_positions,
        "max_sentences": max_sentences,
        "pooling": "mean over every non-padding position (<s> and </s> included)",
        "similarity": "cosine",
        "centring": centring,
        "pairs": model_results,
        "average": _average(model_results),
        "baselines": described_baselines,
    }


CENTRING_WORDS = {"language": "per-language mean-centred", "none": "not centred"}


def format_retrieval_table(result: dict[str, Any]) -> str:
    """A plain-text table: one row per pair, accuracy in percent in both directions, for the
    model and beside it each baseline of the result."""
    columns = [("model", result["pairs"], result["average"])]
    titles = {"random_init": "random init", "tfidf": "TF-IDF pieces"}
    for name, baseline in result.get("baselines", {}).items():
        columns.append((titles.get(name, name), baseline["pairs"], baseline["average"]))
    width = 19
    lines = [
        f"retrieval accuracy (%), layer {result['layer']} of {result['num_layers']}, split {result['split']}, "
        f"embeddings {CENTRING_WORDS.get(result.get('centring', 'none'), result.get('centring'))}",
        f"{'':<12} {'':>9}" + "".join(f"  {title:^{width}}" for title, _, _ in columns),
        f"{'pair':<12} {'sentences':>9}" + f"  {'src->tgt':>9} {'tgt->src':>9}" * len(columns),
    ]
    lines.append("-" * len(lines[-1]))

    def cells(scores: dict[str, Any]) -> str:
        return f"  {100 * scores['src_to_tgt']:>8.1f}% {100 * scores['tgt_to_src']:>8.1f}%"

    for pair, r in result["pairs"].items():
        lines.append(f"{pair:<12} {r['num_pairs']:>9}" + "".join(cells(scores[pair]) for _, scores, _ in columns))
    lines.append(f"{'average':<12} {'':>9}" + "".join(cells(average) for _, _, average in columns))
    return "\n".join(lines)
