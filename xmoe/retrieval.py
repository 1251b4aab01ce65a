"""Cross-lingual sentence retrieval (Tatoeba/BUCC-style, as in XTREME) on held-out parallel pairs.

For each language pair src-tgt of the corpus (e.g. en-de) and its held-out split:
    1. every sentence is encoded on its own as `<s> tokens </s>` (with its language id when the
       model has language embeddings), cut to the model's positions;
    2. its embedding is the mean of the hidden states of one layer over all its positions,
       <s> and </s> included (padding excluded);
    3. each src sentence retrieves the tgt sentence of highest cosine similarity, and vice versa;
       a retrieval is correct when it finds the sentence's own translation (line i <-> line i).
Accuracy is reported per pair in both directions (xmoe.analysis.retrieval_accuracy).

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


def evaluate_pair(
    checkpoint: AnalysedCheckpoint,
    corpus: BinarizedCorpus,
    pair: str,
    split: str,
    layer: int,
    max_positions: int,
    batch_tokens: int,
    device: torch.device,
    max_sentences: Optional[int] = None,
) -> dict[str, Any]:
    """Accuracy of src->tgt and tgt->src retrieval over the first max_sentences pairs of `split`."""
    src, tgt = corpus.split_pair(pair)
    src_lines, tgt_lines = corpus.para_lines(pair, split)
    d = corpus.dictionary
    use_langs = checkpoint.encoder.embed_languages is not None and not corpus.is_plain

    def embed(lines, lang: str) -> torch.Tensor:
        lang_id = corpus.language_id(lang) if use_langs else None
        inputs = sentence_inputs(lines, lang_id, d.bos(), d.eos(), max_positions, limit=max_sentences)
        return sentence_embeddings(checkpoint.encoder, inputs, layer, batch_tokens, device)

    accuracy = retrieval_accuracy(embed(src_lines, src), embed(tgt_lines, tgt))
    return {"src": src, "tgt": tgt, **accuracy}


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
) -> dict[str, Any]:
    """Retrieval accuracy of every pair in `pairs` (see the module doc), as a JSON-ready dict."""
    num_layers = len(checkpoint.encoder.layers)
    layer = default_retrieval_layer(num_layers) if layer is None else layer
    model_positions = checkpoint.config.max_positions
    max_positions = model_positions if max_positions is None else min(max_positions, model_positions)
    if not pairs:
        raise AnalysisInputError(f"no parallel pair with {split!r} data in {corpus.root}")
    results: dict[str, Any] = {}
    for pair in pairs:
        started = time.perf_counter()
        results[pair] = evaluate_pair(
            checkpoint, corpus, pair, split, layer, max_positions, batch_tokens, device, max_sentences
        )
        if progress:
            r = results[pair]
            progress(
                f"{pair}: {r['num_pairs']} pairs, {r['src']}->{r['tgt']} {r['src_to_tgt']:.3f}, "
                f"{r['tgt']}->{r['src']} {r['tgt_to_src']:.3f} ({time.perf_counter() - started:.1f} s)"
            )
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
        "pairs": results,
        "average": {
            direction: float(np.mean([r[direction] for r in results.values()]))
            for direction in ("src_to_tgt", "tgt_to_src")
        },
    }


def format_retrieval_table(result: dict[str, Any]) -> str:
    """A plain-text table: one row per pair, accuracy in percent in both directions."""
    header = f"{'pair':<12} {'sentences':>9} {'src->tgt':>9} {'tgt->src':>9}"
    lines = [f"retrieval accuracy, layer {result['layer']} of {result['num_layers']}, split {result['split']}",
             header, "-" * len(header)]
    for pair, r in result["pairs"].items():
        lines.append(f"{pair:<12} {r['num_pairs']:>9} {100 * r['src_to_tgt']:>8.1f}% {100 * r['tgt_to_src']:>8.1f}%")
    average = result["average"]
    lines.append(f"{'average':<12} {'':>9} {100 * average['src_to_tgt']:>8.1f}% {100 * average['tgt_to_src']:>8.1f}%")
    return "\n".join(lines)
