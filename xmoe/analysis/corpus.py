"""Fixed, deterministic token samples from a binarized corpus, for the analysis commands and
the retrieval evaluation.

Reads the binarized layout of docs/CONTRACTS.md (DATA/manifest.json, dict.txt, mono/, para/),
or a plain fairseq-preprocess folder (DATA/dict.txt + DATA/{split}.bin/.idx, as fairseq's
masked_lm task reads it), which then counts as one group named "all" without language ids.

Samples are built exactly as the `xmoe_mlm_tlm` task builds its inputs, without masking:
    language group: `<s> line </s> line </s> ...` blocks of whole lines (MonolingualBlockDataset)
    pair group:     `<s> src </s> tgt </s>`, positions restarting at the target (ParallelPairDataset)
and a group's sample is the first N tokens of that stream (the last sequence is cut to fit), so
every checkpoint analysed with the same options sees the very same tokens.

Shape letters: T = tokens of one sequence.

NOTE: unlike the rest of xmoe.analysis, this module imports fairseq (its Dictionary and its
mmap dataset reader, the one way the project reads binarized data).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

PLAIN_GROUP = "all"  # the one group of a plain fairseq-preprocess folder
LANGUAGE, PAIR = "language", "pair"  # group kinds


class AnalysisInputError(ValueError):
    """A problem with what the user passed (a missing file, a checkpoint of the wrong kind, a
    data folder that does not match the model). The CLI prints the message and exits with 2."""


@dataclass
class EncoderInput:
    """One sequence as the encoder takes it (docs/CONTRACTS.md, "Model inputs")."""

    tokens: torch.Tensor  # (T,) long, starts with <s>
    langs: Optional[torch.Tensor]  # (T,) long language ids; None: no language information
    positions: Optional[torch.Tensor]  # (T,) long; None: 0..T-1
    group: int  # index into TokenSample.group_names


@dataclass
class TokenSample:
    """The sequences of every group, group after group, each group's in corpus order."""

    group_names: list[str]  # languages first, then pairs, e.g. ["en", "de", "en-de"]
    group_kinds: list[str]  # LANGUAGE or PAIR, one per group
    sequences: list[EncoderInput]

    def tokens_per_group(self) -> dict[str, int]:
        counts = dict.fromkeys(self.group_names, 0)
        for sequence in self.sequences:
            counts[self.group_names[sequence.group]] += len(sequence.tokens)
        return counts

    @property
    def num_tokens(self) -> int:
        return sum(len(sequence.tokens) for sequence in self.sequences)


def _comma_list(text: Optional[str]) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


class BinarizedCorpus:
    """A DATA folder: its languages (the manifest order gives the language ids), pairs and
    dictionary (with the `<mask>` symbol the pre-training tasks append, so that its size is the
    model's vocabulary size)."""

    def __init__(self, root: str):
        # Imported here so that `xmoe.analysis` itself (metrics, plots) never needs fairseq.
        from fairseq.data import Dictionary

        from xmoe.tasks.mlm_tlm import MASK_SYMBOL, load_manifest

        self.root = root
        if not os.path.isdir(root):
            raise AnalysisInputError(f"data folder {root!r} does not exist")
        if os.path.isfile(os.path.join(root, "manifest.json")):
            try:
                manifest = load_manifest(root)
            except (FileNotFoundError, ValueError) as error:
                raise AnalysisInputError(str(error)) from error
            self.is_plain = False
            self.languages: list[str] = list(manifest["languages"])
            self.pairs: list[str] = list(manifest["pairs"])
            dictionary_name = manifest.get("dictionary", "dict.txt")
        elif os.path.isfile(os.path.join(root, "dict.txt")):
            self.is_plain = True
            self.languages, self.pairs = [PLAIN_GROUP], []
            dictionary_name = "dict.txt"
        else:
            raise AnalysisInputError(
                f"{root!r} is not a binarized data folder: it has neither manifest.json "
                "(data-prep/binarize.py) nor dict.txt (fairseq-preprocess)"
            )
        self.dictionary_path = os.path.join(root, dictionary_name)
        if not os.path.isfile(self.dictionary_path):
            raise AnalysisInputError(f"dictionary {self.dictionary_path} is missing")
        self.dictionary = Dictionary.load(self.dictionary_path)
        self.dictionary.add_symbol(MASK_SYMBOL)

    # ---- what exists ---------------------------------------------------------------

    def _mono_prefix(self, lang: str, split: str) -> str:
        if self.is_plain:
            return os.path.join(self.root, split)
        return os.path.join(self.root, "mono", lang, split)

    def _para_prefix(self, pair: str, split: str, lang: str) -> str:
        return os.path.join(self.root, "para", pair, f"{split}.{lang}")

    @staticmethod
    def _exists(prefix: str) -> bool:
        return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")

    def split_pair(self, pair: str) -> tuple[str, str]:
        from xmoe.tasks.mlm_tlm import split_pair

        sides = split_pair(pair, self.languages)
        if sides is None:
            raise AnalysisInputError(f"pair {pair!r} does not join two languages of {self.root}")
        return sides

    def languages_with_data(self, split: str) -> list[str]:
        return [lang for lang in self.languages if self._exists(self._mono_prefix(lang, split))]

    def pairs_with_data(self, split: str) -> list[str]:
        return [
            pair for pair in self.pairs
            if all(self._exists(self._para_prefix(pair, split, lang)) for lang in self.split_pair(pair))
        ]

    def language_id(self, lang: str) -> Optional[int]:
        """The id the model's language embedding expects; None for a plain folder."""
        return None if self.is_plain else self.languages.index(lang)

    def select_languages(self, option: Optional[str], split: str) -> list[str]:
        """--langs: the named languages (each must have `split` data), default all that have it."""
        available = self.languages_with_data(split)
        requested = _comma_list(option)
        if not requested:
            return available
        for lang in requested:
            if lang not in self.languages:
                raise AnalysisInputError(
                    f"--langs: unknown language {lang!r}; {self.root} has {', '.join(self.languages)}"
                )
            if lang not in available:
                raise AnalysisInputError(
                    f"--langs: no monolingual {split!r} data for {lang!r} "
                    f"(missing {self._mono_prefix(lang, split)}.bin/.idx)"
                )
        return requested

    def select_pairs(self, option: Optional[str], split: str) -> list[str]:
        """--pairs: the named pairs, 'none' for no pair, default all pairs with `split` data."""
        if option is not None and option.strip().lower() == "none":
            return []
        available = self.pairs_with_data(split)
        requested = _comma_list(option)
        if not requested:
            return available
        for pair in requested:
            if pair not in self.pairs:
                raise AnalysisInputError(
                    f"--pairs: unknown pair {pair!r}; {self.root} has {', '.join(self.pairs) or 'no pairs'}"
                )
            if pair not in available:
                raise AnalysisInputError(f"--pairs: no {split!r} data for pair {pair!r} in {self.root}/para/{pair}")
        return requested

    # ---- reading -------------------------------------------------------------------

    def _read(self, prefix: str):
        from fairseq.data import indexed_dataset

        if not self._exists(prefix):
            raise AnalysisInputError(f"missing binarized data {prefix}.bin/.idx")
        if os.path.getsize(prefix + ".bin") == 0:
            raise AnalysisInputError(f"{prefix}.bin is empty")
        try:
            return indexed_dataset.MMapIndexedDataset(prefix)
        except Exception as error:  # a truncated or foreign file
            raise AnalysisInputError(f"cannot read {prefix}.bin/.idx: {error}") from error

    def mono_lines(self, lang: str, split: str):
        """Items of mono/{lang}/{split}: dictionary ids of one line followed by </s>."""
        return self._read(self._mono_prefix(lang, split))

    def para_lines(self, pair: str, split: str):
        """(source lines, target lines) of para/{pair}/{split}.{lang}, aligned line by line."""
        src, tgt = self.split_pair(pair)
        src_lines, tgt_lines = self._read(self._para_prefix(pair, split, src)), self._read(
            self._para_prefix(pair, split, tgt)
        )
        if len(src_lines) != len(tgt_lines):
            raise AnalysisInputError(
                f"pair {pair!r} split {split!r}: {len(src_lines)} {src} lines but {len(tgt_lines)} {tgt} lines"
            )
        return src_lines, tgt_lines

    def dictionary_fingerprint(self) -> str:
        return file_fingerprint(self.dictionary_path)


def file_fingerprint(path: str) -> str:
    """sha256 of a file's bytes: two dictionaries are the same exactly when their files are."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def training_dictionary_path(task_cfg: dict) -> Optional[str]:
    """The dictionary file a checkpoint's task read (from its cfg.task.data), if it still exists."""
    data = task_cfg.get("data") if isinstance(task_cfg, dict) else None
    if not isinstance(data, str) or not os.path.isdir(data):
        return None
    name = "dict.txt"
    manifest_path = os.path.join(data, "manifest.json")
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                name = json.load(f).get("dictionary", name)
        except (OSError, ValueError, AttributeError):
            return None
    path = os.path.join(data, name)
    return path if os.path.isfile(path) else None


def _take_first_tokens(items, budget: int, group: int, with_langs: bool) -> list[EncoderInput]:
    """Sequences from the start of `items` (dicts of tokens/langs/positions, each (T,)) until
    `budget` tokens; the last one is cut to fit."""
    sequences = []
    for index in range(len(items)):
        if budget <= 0:
            break
        item = items[index]
        keep = min(len(item["tokens"]), budget)
        sequences.append(
            EncoderInput(
                tokens=item["tokens"][:keep],
                langs=item["langs"][:keep] if with_langs else None,
                positions=item["positions"][:keep],
                group=group,
            )
        )
        budget -= keep
    return sequences


def build_token_sample(
    corpus: BinarizedCorpus,
    split: str,
    languages: Sequence[str],
    pairs: Sequence[str],
    tokens_per_group: int,
    tokens_per_sample: int,
) -> TokenSample:
    """The first `tokens_per_group` tokens of each language's MLM stream and each pair's TLM
    stream in `split`, as sequences of at most `tokens_per_sample` tokens (see the module doc)."""
    from xmoe.data import MonolingualBlockDataset, ParallelPairDataset

    if tokens_per_group < 1:
        raise AnalysisInputError(f"--max-tokens must be >= 1, got {tokens_per_group}")
    if tokens_per_sample < 8:
        raise AnalysisInputError(f"--tokens-per-sample must be at least 8, got {tokens_per_sample}")
    d = corpus.dictionary
    names = list(languages) + list(pairs)
    kinds = [LANGUAGE] * len(languages) + [PAIR] * len(pairs)
    if not names:
        raise AnalysisInputError(f"no language or pair with {split!r} data selected in {corpus.root}")
    sequences: list[EncoderInput] = []
    for group, name in enumerate(names):
        if kinds[group] == LANGUAGE:
            items = MonolingualBlockDataset(
                corpus.mono_lines(name, split), lang_id=corpus.language_id(name) or 0,
                bos=d.bos(), pad=d.pad(), eos=d.eos(), max_tokens=tokens_per_sample,
            )
        else:
            src, tgt = corpus.split_pair(name)
            src_lines, tgt_lines = corpus.para_lines(name, split)
            items = ParallelPairDataset(
                src_lines, tgt_lines, corpus.language_id(src), corpus.language_id(tgt),
                bos=d.bos(), eos=d.eos(), max_tokens=tokens_per_sample,
            )
        sequences += _take_first_tokens(items, tokens_per_group, group, with_langs=not corpus.is_plain)
    return TokenSample(group_names=names, group_kinds=kinds, sequences=sequences)


def sentence_inputs(lines, lang_id: Optional[int], bos: int, eos: int, max_positions: int,
                    limit: Optional[int] = None) -> list[EncoderInput]:
    """Each line on its own, `<s> line </s>`, cut to max_positions tokens (keeping the final
    </s>), tagged with lang_id when given: how the retrieval evaluation feeds sentences."""
    if max_positions < 3:
        raise AnalysisInputError(f"max positions must be at least 3, got {max_positions}")
    count = len(lines) if limit is None else min(limit, len(lines))
    inputs = []
    for index in range(count):
        body = lines[index].long()
        if len(body) and body[-1] == eos:
            body = body[:-1]  # binarized items end with </s>; it is added back after the cut
        body = body[: max_positions - 2]
        tokens = torch.cat([body.new_full((1,), bos), body, body.new_full((1,), eos)])  # (T,)
        langs = None if lang_id is None else torch.full_like(tokens, lang_id)
        inputs.append(EncoderInput(tokens=tokens, langs=langs, positions=None, group=0))
    return inputs
