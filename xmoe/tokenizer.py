"""Text -> dictionary ids exactly as pre-training saw them, without fairseq.

Pre-training text goes through two tables: the sentencepiece model turns a line into pieces
(data-prep/binarize.py), and the fairseq dictionary (DATA/dict.txt, with `<s> <pad> </s> <unk>`
in front and `<mask>` appended by the task) turns pieces into ids. A line is stored as
`ids </s>`, and the task puts `<s>` in front of every sample, so one sentence reaches the
model as `<s> ids </s>`. `XMoETokenizer.encode` reproduces that, `encode_pair` gives the
layout of two consecutive sentences of a monolingual block (`<s> a </s> b </s>`), and `batch`
pads rows with `<pad>` (and builds the language-id rows the model's language embeddings take).

Shape legend: B = sentences in a batch, T = longest row (tokens).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

# The files of an exported folder (xmoe-export) that make up the tokenizer.
TOKENIZER_CONFIG_FILE, SPM_FILE, DICT_FILE = "tokenizer_config.json", "sentencepiece.model", "dict.txt"

BOS, PAD, EOS, UNK = "<s>", "<pad>", "</s>", "<unk>"
MASK = "<mask>"  # appended by the pre-training tasks (fairseq's masked_lm and xmoe_mlm_tlm)
OVERWRITE_FLAG = "#fairseq:overwrite"

# A language is given by its code (an entry of the manifest's "languages") or its id.
Language = Union[str, int]


class FairseqVocabulary:
    """The id <-> symbol table of a fairseq Dictionary as the pre-training task built it:
    `Dictionary.load(dict.txt)` then `add_symbol("<mask>")`, with fairseq's rules for repeated
    entries (`#fairseq:overwrite`) and without importing fairseq.
    """

    def __init__(self, dict_path: str, add_mask: bool = True):
        self.path = dict_path
        self.symbols: list[str] = []
        self.indices: dict[str, int] = {}
        for special in (BOS, PAD, EOS, UNK):
            self._add(special)
        self.bos, self.pad, self.eos, self.unk = 0, 1, 2, 3
        self.nspecial = len(self.symbols)
        self._read(dict_path)
        self.mask = self._add(MASK) if add_mask else None

    def _add(self, symbol: str, overwrite: bool = False) -> int:
        # fairseq's Dictionary.add_symbol: a known symbol keeps its id unless overwritten, in
        # which case it gets a NEW id at the end (its old slot stays, unreachable by lookup).
        if symbol in self.indices and not overwrite:
            return self.indices[symbol]
        self.indices[symbol] = len(self.symbols)
        self.symbols.append(symbol)
        return self.indices[symbol]

    def _read(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"dictionary {path!r} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 ({error})") from None
        for line_no, line in enumerate(lines, start=1):
            fields = line.rstrip().rsplit(" ", 1)
            overwrite = len(fields) == 2 and fields[1] == OVERWRITE_FLAG
            if overwrite:
                fields = fields[0].rsplit(" ", 1)
            if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
                raise ValueError(f"{path}:{line_no}: expected '<piece> <count> [{OVERWRITE_FLAG}]', got {line!r}")
            symbol = fields[0]
            if symbol in self.indices and not overwrite:
                raise ValueError(f"{path}:{line_no}: {symbol!r} is listed twice (fairseq refuses that too)")
            self._add(symbol, overwrite)

    def __len__(self) -> int:
        return len(self.symbols)

    def index(self, symbol: str) -> int:
        return self.indices.get(symbol, self.unk)

    def symbol(self, index: int) -> str:
        return self.symbols[index] if 0 <= index < len(self.symbols) else UNK


@dataclass
class EncodedBatch:
    """A padded batch in the model's input layout (docs/CONTRACTS.md, "Model inputs")."""

    src_tokens: torch.Tensor  # (B, T) long, right-padded with the pad id
    src_langs: Optional[torch.Tensor]  # (B, T) long language ids, or None
    lengths: torch.Tensor  # (B,) long: real tokens per row

    @property
    def padding_mask(self) -> torch.Tensor:
        """(B, T) bool, True at padding."""
        return torch.arange(self.src_tokens.shape[1], device=self.lengths.device) >= self.lengths.unsqueeze(1)

    def to(self, device: Union[str, torch.device]) -> "EncodedBatch":
        langs = None if self.src_langs is None else self.src_langs.to(device)
        return EncodedBatch(self.src_tokens.to(device), langs, self.lengths.to(device))

    def model_inputs(self) -> dict[str, Optional[torch.Tensor]]:
        """Keyword arguments for XMoEEncoder.forward."""
        return {"src_tokens": self.src_tokens, "src_langs": self.src_langs}


class XMoETokenizer:
    """Sentencepiece model + fairseq dictionary, encoding like pre-training.

    languages: the manifest's language codes (the language id of a code is its index); only
    needed to pass languages by code. max_positions: the model's position table; rows longer
    than that are cut (keeping their final `</s>`).
    """

    def __init__(
        self,
        spm_model_path: str,
        dict_path: str,
        languages: Optional[Sequence[str]] = None,
        max_positions: Optional[int] = None,
    ):
        import sentencepiece

        if not os.path.isfile(spm_model_path):
            raise FileNotFoundError(f"sentencepiece model {spm_model_path!r} does not exist")
        self.spm_model_path = spm_model_path
        self.processor = sentencepiece.SentencePieceProcessor()
        try:
            self.processor.Load(spm_model_path)
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{spm_model_path} is not a sentencepiece model ({error})") from None
        self.vocab = FairseqVocabulary(dict_path)
        self.languages = list(languages) if languages is not None else None
        self.max_positions = max_positions
        # spm piece id -> dictionary id (data-prep/binarize.py builds the same table; pieces the
        # dictionary lacks become <unk>, and so does spm's own unknown piece).
        self._piece_to_id = [self.vocab.index(self.processor.id_to_piece(i)) for i in range(self.processor.get_piece_size())]
        self._piece_to_id[self.processor.unk_id()] = self.vocab.unk

    @classmethod
    def from_pretrained(cls, path: str, *unused_args: Any, max_positions: Optional[int] = None, **unused_kwargs: Any) -> "XMoETokenizer":
        """The tokenizer of an exported folder (its tokenizer_config.json names the files).
        transformers' AutoTokenizer calls this too (trust_remote_code=True) for a folder without
        a standard tokenizer.json, with arguments of its own that do not apply here."""
        settings: dict[str, Any] = {}
        config_path = os.path.join(path, TOKENIZER_CONFIG_FILE)
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                settings = json.load(f)
        return cls(
            os.path.join(path, settings.get("spm_model", SPM_FILE)),
            os.path.join(path, settings.get("dictionary", DICT_FILE)),
            languages=settings.get("languages"),
            max_positions=max_positions or settings.get("model_max_length"),
        )

    def tokenizer_config(self) -> dict[str, Any]:
        """What tokenizer_config.json holds for this class: the files, the specials, the language
        codes."""
        return {
            "spm_model": SPM_FILE,
            "dictionary": DICT_FILE,
            "encoding": "<s> pieces </s>; pairs <s> a </s> b </s>; <mask> appended to the dictionary",
            "bos_token": BOS,
            "pad_token": PAD,
            "eos_token": EOS,
            "unk_token": UNK,
            "mask_token": MASK,
            "mask_token_id": self.mask_id,
            "vocab_size": len(self),
            "model_max_length": self.max_positions,
            "languages": self.languages,
        }

    def save_pretrained(self, out_dir: str, *unused_args: Any, **unused_kwargs: Any) -> tuple[str, ...]:
        """Write the sentencepiece model, dict.txt, tokenizer_config.json and this module (as
        tokenizer.py) to out_dir; returns the paths.

        A tokenizer_config.json already there (the standard tokenizer's, written first by
        xmoe-export next to its tokenizer.json) keeps its entries and gains this class's file
        names and language codes; AutoTokenizer then loads the standard tokenizer. Without a
        tokenizer.json, AutoTokenizer (trust_remote_code=True) is pointed at this class."""
        import shutil

        os.makedirs(out_dir, exist_ok=True)
        paths = tuple(os.path.join(out_dir, name) for name in (SPM_FILE, DICT_FILE, TOKENIZER_CONFIG_FILE, "tokenizer.py"))
        # This module imports nothing from xmoe, so it is valid remote code as it is.
        for source, target in ((self.spm_model_path, paths[0]), (self.vocab.path, paths[1]), (__file__, paths[3])):
            if not (os.path.exists(target) and os.path.samefile(source, target)):
                shutil.copyfile(source, target)
        settings = self.tokenizer_config()
        if os.path.isfile(paths[2]):
            with open(paths[2], encoding="utf-8") as f:
                existing = json.load(f)
            # the standard tokenizer's own entries (e.g. how <mask> strips spaces) stay as they are
            settings = {**existing, **{k: v for k, v in settings.items() if k not in existing}}
        if not os.path.isfile(os.path.join(out_dir, "tokenizer.json")):
            settings["auto_map"] = {"AutoTokenizer": ["tokenizer.XMoETokenizer", None]}
        with open(paths[2], "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2)
            f.write("\n")
        return paths

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoTokenizer") -> None:
        """Called by transformers' AutoTokenizer on remote-code tokenizers; nothing to register."""

    # ---- ids ----------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        return self.vocab.pad

    @property
    def bos_id(self) -> int:
        return self.vocab.bos

    @property
    def eos_id(self) -> int:
        return self.vocab.eos

    @property
    def mask_id(self) -> int:
        return self.vocab.mask

    def __len__(self) -> int:
        return len(self.vocab)

    def check_dictionary_matches_model(self) -> None:
        """Every dictionary entry must be a piece of the sentencepiece model (fairseq's specials
        aside); otherwise dict.txt was made for another model. Raises ValueError naming the line."""
        unk_piece = self.processor.id_to_piece(self.processor.unk_id())
        specials = {BOS, PAD, EOS, UNK, MASK}
        for index, symbol in enumerate(self.vocab.symbols[self.vocab.nspecial :], start=1):
            if symbol in specials or symbol.startswith("madeupword"):  # fairseq's vocabulary padding
                continue
            if self.processor.piece_to_id(symbol) == self.processor.unk_id() and symbol != unk_piece:
                raise ValueError(
                    f"{self.vocab.path}: entry {index} ({symbol!r}) is not a piece of the sentencepiece "
                    f"model {self.spm_model_path}: the dictionary belongs to another model"
                )

    def language_id(self, language: Language) -> int:
        if isinstance(language, int):
            return language
        if self.languages is None:
            raise ValueError(f"language {language!r} given by code, but this tokenizer has no language list")
        if language not in self.languages:
            raise ValueError(f"unknown language {language!r}; the model knows {self.languages}")
        return self.languages.index(language)

    # ---- encoding -----------------------------------------------------------------------
    def pieces(self, text: str) -> list[str]:
        return self.processor.encode(text, out_type=str)

    def encode_body(self, text: str) -> list[int]:
        """Dictionary ids of the pieces of `text`, without `<s>`/`</s>`."""
        return [self._piece_to_id[i] for i in self.processor.encode(text)]

    def encode(self, text: str) -> list[int]:
        """`<s> ids </s>`: one sentence as the pre-training task feeds it to the model."""
        body = self.encode_body(text)
        if self.max_positions is not None:
            body = body[: self.max_positions - 2]
        return [self.bos_id, *body, self.eos_id]

    def encode_pair(self, text_a: str, text_b: str) -> list[int]:
        """`<s> a </s> b </s>`: two consecutive sentences of one pre-training block. When the pair
        is longer than max_positions, a short side stays whole and the long side is cut
        (each keeps about half when both are long), as TLM pre-training cuts its pairs."""
        body_a, body_b = self.encode_body(text_a), self.encode_body(text_b)
        if self.max_positions is not None:
            budget = self.max_positions - 3
            keep_a = min(len(body_a), max(budget // 2, budget - len(body_b)))
            body_a, body_b = body_a[:keep_a], body_b[: budget - keep_a]
        return [self.bos_id, *body_a, self.eos_id, *body_b, self.eos_id]

    def batch(
        self,
        texts: Sequence[Union[str, tuple[str, str], Sequence[int]]],
        languages: Optional[Union[Language, Sequence[Language]]] = None,
    ) -> EncodedBatch:
        """Encode and right-pad. An item is a text, a (text_a, text_b) pair or a list of ids.
        languages: one language for the whole batch or one per item; None = no language ids."""
        rows = [self._encode_item(item) for item in texts]
        if not rows:
            raise ValueError("cannot build a batch of zero texts")
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        tokens_BT = torch.full((len(rows), int(lengths.max())), self.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens_BT[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        langs_BT = None if languages is None else self.language_rows(languages, tokens_BT)
        return EncodedBatch(tokens_BT, langs_BT, lengths)

    def language_rows(self, languages: Union[Language, Sequence[Language]], tokens_BT: torch.Tensor) -> torch.Tensor:
        """(B, T) language ids for a padded batch: one language for all rows or one per row."""
        num_rows = tokens_BT.shape[0]
        per_row = [languages] * num_rows if isinstance(languages, (str, int)) else list(languages)
        if len(per_row) != num_rows:
            raise ValueError(f"{len(per_row)} languages for {num_rows} rows")
        ids_B = torch.tensor([self.language_id(lang) for lang in per_row], dtype=torch.long, device=tokens_BT.device)
        # Padding gets language 0: the model zeroes padding positions after the embeddings anyway.
        return ids_B.unsqueeze(1).expand_as(tokens_BT).masked_fill(tokens_BT.eq(self.pad_id), 0).contiguous()

    def __call__(
        self,
        text: Union[str, Sequence[str]],
        text_pair: Optional[Union[str, Sequence[str]]] = None,
        languages: Optional[Union[Language, Sequence[Language]]] = None,
        return_tensors: Optional[str] = "pt",
        **unused: Any,
    ) -> dict[str, torch.Tensor]:
        """transformers-style call: {"input_ids", "attention_mask"[, "language_ids"]} (B, T)
        tensors for the exported model, padded to the longest row and cut at max_positions
        (padding/truncation arguments are accepted and those rules always apply)."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"only PyTorch tensors are supported (return_tensors='pt'), got {return_tensors!r}")
        texts = [text] if isinstance(text, str) else list(text)
        if text_pair is not None:
            pairs = [text_pair] if isinstance(text_pair, str) else list(text_pair)
            if len(pairs) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(pairs)} text pairs")
            texts = list(zip(texts, pairs))
        batch = self.batch(texts, languages)
        inputs = {"input_ids": batch.src_tokens, "attention_mask": (~batch.padding_mask).long()}
        if batch.src_langs is not None:
            inputs["language_ids"] = batch.src_langs
        return inputs

    def _encode_item(self, item) -> list[int]:
        if isinstance(item, str):
            return self.encode(item)
        if isinstance(item, tuple) and len(item) == 2 and all(isinstance(t, str) for t in item):
            return self.encode_pair(*item)
        ids = [int(i) for i in item]
        if not ids:
            raise ValueError("an item of ids is empty")
        return ids

    # ---- decoding -----------------------------------------------------------------------
    def decode(self, ids: Sequence[int]) -> str:
        """Text of dictionary ids: `<s> <pad> <mask>` are dropped, `</s>` ends a sentence
        (sentences are joined by a space), <unk> reads as sentencepiece's unknown mark."""
        sentences: list[list[str]] = [[]]
        for index in (int(i) for i in ids):
            if index == self.eos_id:
                sentences.append([])
            elif index not in (self.bos_id, self.pad_id, self.mask_id):
                sentences[-1].append(self.vocab.symbol(index))
        return " ".join(self.processor.decode_pieces(pieces) for pieces in sentences if pieces)
