"""Run a trained encoder over fixed inputs and record what the analyses need: the router's
choice per token in every MoE layer, the token representations the router saw, hidden states.

Shape legend: B = sequences in a batch, T = positions, C = model dim, N = tokens of the whole
sample (non-padding positions, sequence after sequence, in sample order), L = MoE layers.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from xmoe.analysis.corpus import (
    AnalysisInputError,
    BinarizedCorpus,
    EncoderInput,
    TokenSample,
    file_fingerprint,
    training_dictionary_path,
)

DEFAULT_TOKENS_PER_SAMPLE = 512


@dataclass
class AnalysedCheckpoint:
    """A trained xmoe_encoder, loaded for evaluation, with what the analyses report about it."""

    path: str
    encoder: Any  # xmoe.encoder.XMoEEncoder, in eval mode
    config: Any  # xmoe.encoder.EncoderConfig
    cfg: dict  # the checkpoint's full fairseq cfg
    num_updates: Optional[int]  # from optimizer_history; None when the file has none

    @property
    def moe_layer_indices(self) -> list[int]:
        return list(self.encoder.moe_layer_indices)

    @property
    def num_experts(self) -> int:
        return int(self.config.moe_experts)

    @property
    def task_cfg(self) -> dict:
        return dict(self.cfg.get("task") or {})

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "num_updates": self.num_updates}


def load_checkpoint_for_analysis(path: str, need_moe: bool = True) -> AnalysedCheckpoint:
    """load_encoder with errors that say what is wrong with the file (AnalysisInputError)."""
    from xmoe.checkpoint import load_checkpoint_file, load_encoder

    if not os.path.exists(path):
        raise AnalysisInputError(f"checkpoint {path} does not exist")
    if not os.path.isfile(path):
        raise AnalysisInputError(f"checkpoint {path} is not a file")
    try:
        encoder, config, cfg = load_encoder(path)
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as error:
        # KeyError/RuntimeError: the file has no encoder weights, or not the ones the config
        # describes (e.g. another model, or a layout from an older xmoe).
        raise AnalysisInputError(f"cannot load {path} as an xmoe_encoder checkpoint: {error}") from error
    if need_moe and not encoder.moe_layer_indices:
        raise AnalysisInputError(
            f"checkpoint {path} is a dense model (no MoE layer): routing analyses need an X-MoE "
            "(or other sparse) xmoe_encoder checkpoint"
        )
    # load_encoder has already read the file once; the update count is in the same pickle.
    history = load_checkpoint_file(path).get("optimizer_history") or []
    num_updates = history[-1].get("num_updates") if history and isinstance(history[-1], dict) else None
    return AnalysedCheckpoint(
        path=path, encoder=encoder, config=config, cfg=cfg,
        num_updates=int(num_updates) if num_updates is not None else None,
    )


def check_matches_corpus(checkpoint: AnalysedCheckpoint, corpus: BinarizedCorpus) -> None:
    """The checkpoint's token ids must mean what the corpus's dictionary says they mean."""
    vocab = checkpoint.config.vocab_size
    if vocab != len(corpus.dictionary):
        raise AnalysisInputError(
            f"dictionary mismatch: {checkpoint.path} has a vocabulary of {vocab} tokens but "
            f"{corpus.dictionary_path} (+ <mask>) has {len(corpus.dictionary)}: the model was "
            "trained on other data"
        )
    trained_on = training_dictionary_path(checkpoint.task_cfg)
    if trained_on is not None and file_fingerprint(trained_on) != corpus.dictionary_fingerprint():
        raise AnalysisInputError(
            f"dictionary mismatch: {checkpoint.path} was trained with {trained_on}, which differs "
            f"from {corpus.dictionary_path}"
        )
    if checkpoint.encoder.embed_languages is not None and not corpus.is_plain:
        if len(corpus.languages) > checkpoint.config.num_languages:
            raise AnalysisInputError(
                f"{checkpoint.path} has {checkpoint.config.num_languages} language embeddings but "
                f"{corpus.root} lists {len(corpus.languages)} languages"
            )


def check_same_routing_setup(checkpoints: Sequence[AnalysedCheckpoint]) -> None:
    """Checkpoints compared token by token must share the vocabulary and the MoE layout."""
    first = checkpoints[0]
    first_dictionary = training_dictionary_path(first.task_cfg)
    for other in checkpoints[1:]:
        if other.config.vocab_size != first.config.vocab_size:
            raise AnalysisInputError(
                f"dictionary mismatch between checkpoints: {first.path} has {first.config.vocab_size} "
                f"tokens, {other.path} has {other.config.vocab_size}"
            )
        other_dictionary = training_dictionary_path(other.task_cfg)
        if (
            first_dictionary and other_dictionary
            and file_fingerprint(first_dictionary) != file_fingerprint(other_dictionary)
        ):
            raise AnalysisInputError(
                f"dictionary mismatch between checkpoints: {first.path} was trained with "
                f"{first_dictionary}, {other.path} with {other_dictionary}"
            )
        if (other.moe_layer_indices, other.num_experts) != (first.moe_layer_indices, first.num_experts):
            raise AnalysisInputError(
                f"checkpoints differ in their MoE layers: {first.path} has layers "
                f"{first.moe_layer_indices} of {first.num_experts} experts, {other.path} has "
                f"{other.moe_layer_indices} of {other.num_experts}"
            )


def default_tokens_per_sample(checkpoints: Sequence[AnalysedCheckpoint]) -> int:
    """The pre-training sample length (task tokens_per_sample), within every model's positions."""
    lengths = [
        min(int(c.task_cfg.get("tokens_per_sample") or DEFAULT_TOKENS_PER_SAMPLE), c.config.max_positions)
        for c in checkpoints
    ]
    return min(lengths)


def set_eval_capacity_factor(encoder, factor: float) -> None:
    """Capacity of every MoE layer in eval mode; <= 0 is dropless (no token is dropped, so a
    token's output does not depend on which other sequences share its batch)."""
    for moe in encoder.moe_layers():
        moe.eval_capacity_factor = factor


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise AnalysisInputError(f"--device: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AnalysisInputError("--device cuda: no CUDA device is available")
    return device


# ---------------------------------------------------------------------------------------------
# Batched forward passes
# ---------------------------------------------------------------------------------------------


def batches_by_length(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Sequence indices grouped into batches of similar length, each with at most batch_tokens
    padded positions (rows x longest row; a longer sequence gets a batch of its own)."""
    if batch_tokens < 1:
        raise AnalysisInputError(f"--batch-tokens must be >= 1, got {batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # Sorted ascending, so the newest sequence is the batch's longest.
        if current and (len(current) + 1) * lengths[index] > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


@dataclass
class Batch:
    indices: list[int]  # which sequences, in row order
    src_tokens: torch.Tensor  # (B, T), padded with the padding index
    src_langs: Optional[torch.Tensor]  # (B, T) or None
    src_positions: torch.Tensor  # (B, T)
    padding_mask: torch.Tensor  # (B, T) True at padding


def collate(inputs: Sequence[EncoderInput], indices: list[int], padding_idx: int, use_langs: bool,
            device: torch.device) -> Batch:
    rows = [inputs[i] for i in indices]
    longest = max(len(row.tokens) for row in rows)
    tokens = torch.full((len(rows), longest), padding_idx, dtype=torch.long)
    langs = torch.zeros((len(rows), longest), dtype=torch.long)
    positions = torch.zeros((len(rows), longest), dtype=torch.long)
    for r, row in enumerate(rows):
        length = len(row.tokens)
        tokens[r, :length] = row.tokens
        positions[r, :length] = row.positions if row.positions is not None else torch.arange(length)
        if row.langs is not None:
            langs[r, :length] = row.langs
    with_langs = use_langs and all(row.langs is not None for row in rows)
    return Batch(
        indices=indices,
        src_tokens=tokens.to(device),
        src_langs=langs.to(device) if with_langs else None,
        src_positions=positions.to(device),
        padding_mask=tokens.eq(padding_idx).to(device),
    )


def forward_batches(
    encoder,
    inputs: Sequence[EncoderInput],
    batch_tokens: int,
    device: torch.device,
    return_all_hiddens: bool = False,
    capture_moe_inputs: bool = False,
) -> Iterator[tuple[Batch, dict[str, Any], list[torch.Tensor]]]:
    """Yield (batch, extra, moe_inputs) for every batch, in eval mode without gradients.

    extra is XMoEEncoder.forward's (moe_aux, inner_states, padding_mask); moe_inputs holds, per
    MoE layer in order, the (B, T, C) hidden states the layer received (what its router scores),
    captured by a forward pre-hook when capture_moe_inputs is set, else an empty list.
    """
    encoder.to(device).eval()
    use_langs = encoder.embed_languages is not None
    if use_langs:
        largest = max((int(x.langs.max()) for x in inputs if x.langs is not None and len(x.langs)), default=-1)
        if largest >= encoder.cfg.num_languages:
            raise AnalysisInputError(
                f"language id {largest} out of range for the model's {encoder.cfg.num_languages} language embeddings"
            )
    captured: list[torch.Tensor] = []
    hooks = []
    if capture_moe_inputs:
        for moe in encoder.moe_layers():
            hooks.append(moe.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach())))
    try:
        with torch.inference_mode():
            for indices in batches_by_length([len(x.tokens) for x in inputs], batch_tokens):
                batch = collate(inputs, indices, encoder.padding_idx, use_langs, device)
                captured.clear()
                _, extra = encoder(
                    batch.src_tokens, src_langs=batch.src_langs, src_positions=batch.src_positions,
                    features_only=True, return_all_hiddens=return_all_hiddens,
                )
                yield batch, extra, list(captured)
    finally:
        for hook in hooks:
            hook.remove()


@dataclass
class RoutingProbe:
    """Per MoE layer, per token of the sample (N tokens, in sample order)."""

    layer_indices: list[int]  # encoder layer index of each MoE layer
    routed: list[np.ndarray] = field(default_factory=list)  # (N,) router's top-1 before capacity
    kept: list[np.ndarray] = field(default_factory=list)  # (N,) expert after capacity, -1 = dropped
    moe_inputs: list[Optional[torch.Tensor]] = field(default_factory=list)  # (N, C) float32 or None
    groups: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (N,)


def probe_routing(
    checkpoint: AnalysedCheckpoint,
    sample: TokenSample,
    batch_tokens: int,
    device: torch.device,
    capture_moe_inputs: bool = False,
    progress: Optional[Callable[[str], None]] = None,
) -> RoutingProbe:
    """Route every token of `sample` through the checkpoint's encoder and collect, per MoE layer,
    the router's choice (MoEAux.routed_index) and, optionally, the router's input."""
    encoder = checkpoint.encoder
    num_moe = len(encoder.moe_layer_indices)
    inputs = sample.sequences
    # Per sequence, per MoE layer: filled batch by batch, joined in sample order at the end.
    routed_by_seq: list[list[Optional[torch.Tensor]]] = [[None] * len(inputs) for _ in range(num_moe)]
    kept_by_seq: list[list[Optional[torch.Tensor]]] = [[None] * len(inputs) for _ in range(num_moe)]
    features_by_seq: list[list[Optional[torch.Tensor]]] = [[None] * len(inputs) for _ in range(num_moe)]
    started = time.perf_counter()
    num_batches = 0
    for batch, extra, moe_inputs in forward_batches(
        encoder, inputs, batch_tokens, device, capture_moe_inputs=capture_moe_inputs
    ):
        num_batches += 1
        lengths = [len(inputs[i].tokens) for i in batch.indices]
        for layer, aux in enumerate(extra["moe_aux"]):
            routed_BT = aux.routed_index.cpu()
            kept_BT = aux.expert_index.cpu()
            features_BTC = moe_inputs[layer].float().cpu() if capture_moe_inputs else None
            for row, (index, length) in enumerate(zip(batch.indices, lengths)):
                # Right padding: a sequence's tokens are the first `length` positions of its row.
                routed_by_seq[layer][index] = routed_BT[row, :length]
                kept_by_seq[layer][index] = kept_BT[row, :length]
                if features_BTC is not None:
                    features_by_seq[layer][index] = features_BTC[row, :length]
    if progress:
        progress(f"{sample.num_tokens} tokens in {num_batches} batches, {time.perf_counter() - started:.1f} s")

    groups = np.concatenate([np.full(len(x.tokens), x.group, dtype=np.int64) for x in inputs])
    probe = RoutingProbe(layer_indices=list(encoder.moe_layer_indices), groups=groups)
    for layer in range(num_moe):
        probe.routed.append(torch.cat(routed_by_seq[layer]).numpy().astype(np.int64))
        probe.kept.append(torch.cat(kept_by_seq[layer]).numpy().astype(np.int64))
        probe.moe_inputs.append(torch.cat(features_by_seq[layer]) if capture_moe_inputs else None)
    return probe
