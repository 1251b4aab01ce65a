"""The `xmoe_mlm_tlm` task: multilingual masked LM interleaved with translation LM.

Reads the binarized layout of docs/CONTRACTS.md:
    DATA/manifest.json, DATA/dict.txt, DATA/mono/{lang}/{split}.bin/.idx,
    DATA/para/{src}-{tgt}/{split}.{lang}.bin/.idx
and produces the task samples of the contract (src_tokens, src_lengths, src_langs,
src_positions, target).

Training: MLM blocks of whole lines, languages drawn with probability ~ p_l^alpha,
and TLM pairs `<s> src </s> tgt </s>`, pairs drawn by the same rule; a batch holds
either MLM or TLM samples and the two kinds alternate at --mlm-tlm-ratio.
Validation: one group per language and per pair, batched separately; the task logs
`loss_{group}` / `ppl_{group}` next to the criterion's overall loss and ppl.
"""

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from fairseq import metrics, utils
from fairseq.data import BaseWrapperDataset, Dictionary, indexed_dataset, iterators
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING

from xmoe.data import (
    ElasticEpochBatchIterator,
    GroupedMaskedDataset,
    MonolingualBlockDataset,
    ParallelPairDataset,
    TokenMasker,
    resample_by_alpha,
    size_limit,
    word_start_table,
)
from xmoe.tokenizer import FairseqVocabulary

logger = logging.getLogger(__name__)

TASK_NAME = "xmoe_mlm_tlm"
MASK_SYMBOL = "<mask>"
MLM_GROUP, TLM_GROUP = "mlm", "tlm"
# logging-output keys carrying one group's loss sum and sample size
GROUP_LOSS_KEY, GROUP_SIZE_KEY = "group_loss:{}", "group_sample_size:{}"
# criterion logging keys holding the summed masked-LM NLL, most specific first:
# xmoe_masked_lm adds the MoE balance terms to "loss" and logs the bare NLL as "mlm_loss"
CRITERION_NLL_KEYS = ("mlm_loss", "nll_loss", "loss")


@dataclass
class MlmTlmConfig(FairseqDataclass):
    data: str = field(
        default=MISSING,
        metadata={"help": "binarized data folder (manifest.json, dict.txt, mono/, para/) "
                          "written by data-prep/binarize.py"},
    )
    languages: str = field(
        default="",
        metadata={"help": "comma-separated languages for MLM, e.g. en,de "
                          "(default: every language of the manifest)"},
    )
    pairs: str = field(
        default="",
        metadata={"help": "comma-separated language pairs for TLM, e.g. en-de,en-fr (default: "
                          "every manifest pair whose two languages are among --languages)"},
    )
    tokens_per_sample: int = field(
        default=512,
        metadata={"help": "max tokens of one sample, special tokens included (MLM block or "
                          "TLM pair); also the task's max positions"},
    )
    mask_prob: float = field(
        default=0.15, metadata={"help": "share of tokens (or words) selected for prediction"}
    )
    leave_unmasked_prob: float = field(
        default=0.1, metadata={"help": "share of selected tokens left unchanged"}
    )
    random_token_prob: float = field(
        default=0.1, metadata={"help": "share of selected tokens replaced by a random token"}
    )
    mask_whole_words: bool = field(
        default=False,
        metadata={"help": "select whole words (a sentencepiece piece starting with '\u2581' "
                          "begins a word) instead of single pieces"},
    )
    multilang_sampling_alpha: float = field(
        default=0.3,
        metadata={"help": "languages and pairs are drawn with probability ~ p^alpha, p = their "
                          "share of tokens (1: natural mix, 0: uniform; XLM-R uses 0.3)"},
    )
    mlm_tlm_ratio: str = field(
        default="1:1",
        metadata={"help": "training batches MLM:TLM, e.g. 1:1 or 3:1; 1:0 trains MLM only "
                          "(also the case without parallel data)"},
    )
    seed: int = II("common.seed")
    train_subset: str = II("dataset.train_subset")


def parse_batch_ratio(text: str) -> Tuple[int, int]:
    """'3:1' -> (3, 1)."""
    parts = text.split(":")
    try:
        mlm, tlm = (int(p) for p in parts)
    except ValueError:
        mlm = tlm = -1
    if len(parts) != 2 or mlm < 0 or tlm < 0 or mlm + tlm == 0:
        raise ValueError(
            f"--mlm-tlm-ratio must look like MLM:TLM with non-negative integers, not both 0 "
            f"(e.g. 1:1, 3:1, 1:0); got '{text}'"
        )
    return mlm, tlm


class DataError(ValueError):
    """Damaged or mismatched data, found when the task loads it.

    The message is one line, `xmoe_mlm_tlm: FILE[:LINE]: what is wrong`; a fairseq-train
    process that does not catch it prints that line and exits with status 2, without a
    traceback (see `_exit_quietly_on_data_error`).
    """

    exit_code = 2

    def __init__(self, path: str, what: str, line: Optional[int] = None):
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{TASK_NAME}: {where}: {what}")


class MissingDataError(DataError, FileNotFoundError):
    """A file or folder of the data is missing."""


def _exit_quietly_on_data_error(previous_hook):
    """A sys.excepthook: an uncaught DataError becomes its one line and exit status 2.

    NOTE: fairseq-train calls the task from inside its own main(), so nothing of ours
    wraps the call; the hook is the one place that sees the error before Python prints a
    traceback. An interactive session keeps the normal behaviour.
    """

    def hook(kind, error, traceback):
        if isinstance(error, DataError) and not (hasattr(sys, "ps1") or sys.flags.interactive):
            logging.shutdown()
            sys.stdout.flush()
            print(error, file=sys.stderr, flush=True)
            os._exit(DataError.exit_code)  # status 2; there is nothing left to clean up
        previous_hook(kind, error, traceback)

    hook.exits_on_data_error = True
    return hook


if not getattr(sys.excepthook, "exits_on_data_error", False):
    sys.excepthook = _exit_quietly_on_data_error(sys.excepthook)


class IdCheckedLines(BaseWrapperDataset):
    """Lines whose ids are checked against the dictionary as they are read.

    For manifests that do not record each file's largest id (format_version 1): the check
    cannot be made at load time without reading the whole file, so it is made per item, and
    a fault stops training when first met (with the same one line), not in the embedding.
    """

    def __init__(self, lines, bin_path: str, dict_path: str, vocab_size: int):
        super().__init__(lines)
        self.bin_path, self.dict_path, self.vocab_size = bin_path, dict_path, vocab_size

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if len(item) and int(item.max()) >= self.vocab_size:
            raise DataError(
                self.bin_path, f"item {index} holds id {int(item.max())}, but {self.dict_path} has "
                f"{self.vocab_size} entries: not the dictionary this data was binarized with; "
                "restore it or re-run data-prep/binarize.py"
            )
        return item


def split_pair(pair: str, languages: Sequence[str]) -> Optional[Tuple[str, str]]:
    """'en-zh-cn' -> ('en', 'zh-cn').

    Language codes may hold '-' themselves, so look for the cut that names two known languages.
    """
    for cut in range(1, len(pair) - 1):
        if pair[cut] == "-" and pair[:cut] in languages and pair[cut + 1 :] in languages:
            return pair[:cut], pair[cut + 1 :]
    return None


def _comma_list(text: str) -> List[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def load_manifest(data_dir: str) -> Dict[str, Any]:
    """Read and check DATA/manifest.json, with errors that say what to fix."""
    if not data_dir or not os.path.isdir(data_dir):
        raise MissingDataError(
            data_dir, "data folder does not exist (the DATA argument); create it with "
            "data-prep/binarize.py"
        )
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(path):
        raise MissingDataError(
            path, "is missing; DATA must be a folder written by data-prep/binarize.py"
        )
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            path, f"is not valid JSON ({e.msg}, column {e.colno}): cut short or damaged; "
            "re-run data-prep/binarize.py", line=e.lineno,
        ) from None
    except UnicodeDecodeError as e:
        raise DataError(path, f"is not UTF-8 text (byte {e.start}); re-run data-prep/binarize.py") from None
    languages = manifest.get("languages") if isinstance(manifest, dict) else None
    if not (isinstance(languages, list) and languages and all(isinstance(x, str) for x in languages)):
        raise DataError(path, "needs a non-empty list of language codes under 'languages'")
    pairs = manifest.setdefault("pairs", [])
    if not isinstance(pairs, list):
        raise DataError(path, "'pairs' must be a list like [\"en-de\"]")
    for pair in pairs:
        if split_pair(pair, languages) is None:
            raise DataError(
                path, f"pair '{pair}' does not join two of its languages ({', '.join(languages)})"
            )
    return manifest


def load_dictionary(data_dir: str, manifest: Dict[str, Any]) -> Dictionary:
    """DATA's dict.txt, checked line by line (fairseq's own reader names neither file nor line)
    and against the dictionary size binarize.py recorded."""
    path = os.path.join(data_dir, manifest.get("dictionary", "dict.txt"))
    if not os.path.isfile(path):
        raise MissingDataError(path, "the dictionary is missing")
    try:
        FairseqVocabulary(path, add_mask=False)  # fairseq's parsing rules, with line numbers
    except ValueError as e:
        # its messages read "PATH:LINE: what is wrong" (or "PATH: what is wrong")
        where, _, what = str(e).partition(": ")
        line = where.rpartition(":")[2] if where.startswith(path + ":") else None
        raise DataError(path, what, line=int(line) if line else None) from None
    dictionary = Dictionary.load(path)
    recorded = manifest.get("dictionary_size")
    if isinstance(recorded, int) and len(dictionary) != recorded:
        raise DataError(
            path, f"has {len(dictionary)} entries (specials included) but the data was binarized "
            f"with a dictionary of {recorded} ({os.path.join(data_dir, 'manifest.json')}): this "
            "is not the dictionary of this data; restore it or re-run data-prep/binarize.py"
        )
    return dictionary


@register_task(TASK_NAME, dataclass=MlmTlmConfig)
class MlmTlmTask(FairseqTask):
    """Multilingual MLM + TLM pre-training task (see the module docstring)."""

    cfg: MlmTlmConfig

    def __init__(self, cfg: MlmTlmConfig, dictionary: Dictionary, manifest: Dict[str, Any]):
        super().__init__(cfg)
        self.dictionary = dictionary
        self.mask_idx = dictionary.index(MASK_SYMBOL)
        # a token's language id is its language's index in the manifest, whatever the subset
        self.manifest_languages: List[str] = list(manifest["languages"])
        self.manifest_pairs: List[str] = list(manifest["pairs"])
        sizes = manifest.get("sizes")
        self.manifest_sizes: Optional[Dict[str, Any]] = sizes if isinstance(sizes, dict) else None
        files = manifest.get("files")  # format_version 2: what binarize.py wrote, per dataset file
        self.manifest_files: Optional[Dict[str, Any]] = files if isinstance(files, dict) else None
        self._dictionary_path = os.path.join(cfg.data, manifest.get("dictionary", "dict.txt"))
        self.mlm_share, self.tlm_share = parse_batch_ratio(cfg.mlm_tlm_ratio)
        self._check_every_language_has_data()
        self.languages = self._select_languages(cfg.languages)
        self.pairs = self._select_pairs(cfg.pairs, languages_given=bool(_comma_list(cfg.languages)))
        if self.mlm_share > 0 and not self.languages:
            if self.tlm_share == 0:
                raise ValueError(
                    f"{TASK_NAME}: no language has monolingual '{cfg.train_subset}' data in "
                    f"{self._manifest_path}, so there is nothing to train MLM on"
                )
            logger.info(f"{TASK_NAME}: no monolingual data, training TLM only")
            self.mlm_share = 0
        if self.tlm_share > 0 and not self.pairs:
            if self.mlm_share == 0:
                raise ValueError(
                    f"--mlm-tlm-ratio {cfg.mlm_tlm_ratio} asks for TLM only, but no parallel "
                    f"pairs are selected (manifest pairs: {', '.join(self.manifest_pairs) or 'none'})"
                )
            logger.info(f"{TASK_NAME}: no parallel pairs selected, training plain multilingual MLM")
            self.tlm_share = 0
        if cfg.tokens_per_sample < 8:
            raise ValueError(f"--tokens-per-sample must be at least 8, got {cfg.tokens_per_sample}")
        if cfg.multilang_sampling_alpha < 0:
            raise ValueError(
                f"--multilang-sampling-alpha must be >= 0, got {cfg.multilang_sampling_alpha}"
            )
        self.masker = self._build_masker(cfg)
        # every group that may appear in a logging output: training kinds, then validation groups
        self.group_names: List[str] = [MLM_GROUP, TLM_GROUP] + self.languages + self.pairs
        logger.info(
            f"{TASK_NAME}: languages {self.languages}, pairs {self.pairs}, "
            f"batches MLM:TLM = {self.mlm_share}:{self.tlm_share}"
        )

    @classmethod
    def setup_task(cls, cfg: MlmTlmConfig, **kwargs) -> "MlmTlmTask":
        manifest = load_manifest(cfg.data)
        dictionary = load_dictionary(cfg.data, manifest)
        dictionary.add_symbol(MASK_SYMBOL)
        logger.info(f"{TASK_NAME}: dictionary of {cfg.data}: {len(dictionary)} types")
        if not isinstance(manifest.get("files"), dict):
            logger.warning(
                f"{TASK_NAME}: {os.path.join(cfg.data, 'manifest.json')} (format_version "
                f"{manifest.get('format_version')}) does not record each file's largest id: ids "
                "are checked against the dictionary only as items are read; re-run "
                "data-prep/binarize.py to have them checked at load time"
            )
        return cls(cfg, dictionary, manifest)

    # ---- options -------------------------------------------------------------------

    @property
    def _manifest_path(self) -> str:
        return os.path.join(self.cfg.data, "manifest.json")

    def _listed(self, split: str, kind: str) -> Optional[List[str]]:
        """Languages (kind "mono") or pairs ("para") the manifest records data for in `split`;
        None when it keeps no record of the split, and every file is then expected."""
        record = (self.manifest_sizes or {}).get(split)
        if not isinstance(record, dict):
            return None
        return list(record.get(kind) or {})

    def _check_every_language_has_data(self) -> None:
        """A manifest language must have monolingual data in some split or be part of a pair."""
        if self.manifest_sizes is None:
            return
        in_pairs = {
            lang for pair in self.manifest_pairs for lang in split_pair(pair, self.manifest_languages)
        }
        with_mono = {
            lang for record in self.manifest_sizes.values() if isinstance(record, dict)
            for lang in (record.get("mono") or {})
        }
        for lang in self.manifest_languages:
            if lang not in in_pairs and lang not in with_mono:
                expected = os.path.join(self.cfg.data, "mono", lang, self.cfg.train_subset)
                raise FileNotFoundError(
                    f"{TASK_NAME}: {self._manifest_path} lists language '{lang}' but no data for "
                    f"it: no monolingual files (e.g. {expected}.bin) and no pair with it"
                )

    def _check_requested(
        self, option: str, kind: str, requested: List[str], known: List[str],
        with_data: Optional[List[str]], data_kind: str,
    ) -> None:
        """Every requested language / pair is in the manifest and, when the manifest records
        which ones have training data (with_data), has some."""
        for name in requested:
            if name not in known:
                raise ValueError(
                    f"{option}: unknown {kind} '{name}'; {self._manifest_path} lists "
                    f"{', '.join(known) or f'no {kind}s'}"
                )
        for name in requested:
            if with_data is not None and name not in with_data:
                raise ValueError(
                    f"{option}: '{name}' has no {data_kind}'{self.cfg.train_subset}' data; "
                    f"{self._manifest_path} records it for {', '.join(with_data) or 'none'}"
                )

    def _select_languages(self, option: str) -> List[str]:
        """MLM languages: the requested ones, else every language with monolingual training data."""
        requested = _comma_list(option)
        with_mono = self._listed(self.cfg.train_subset, "mono")
        self._check_requested("--languages", "language", requested, self.manifest_languages,
                              with_mono if self.mlm_share > 0 else None, "monolingual ")
        if requested:
            return requested
        if with_mono is None:
            return list(self.manifest_languages)
        with_para = self._listed(self.cfg.train_subset, "para")
        in_train_pairs = {
            lang for pair in self.manifest_pairs if with_para is None or pair in with_para
            for lang in split_pair(pair, self.manifest_languages)
        }
        no_mono = [lang for lang in self.manifest_languages if lang not in with_mono]
        pair_only = [lang for lang in no_mono if lang in in_train_pairs]
        untrained = [lang for lang in no_mono if lang not in in_train_pairs]
        if pair_only:
            logger.info(f"{TASK_NAME}: no monolingual data for {pair_only}: used in TLM pairs only")
        if untrained:
            logger.warning(
                f"{TASK_NAME}: {self._manifest_path}: no '{self.cfg.train_subset}' data for "
                f"{untrained} (no monolingual file, no pair): never trained on, only evaluated"
            )
        return [lang for lang in self.manifest_languages if lang in with_mono]

    def _select_pairs(self, option: str, languages_given: bool) -> List[str]:
        """TLM pairs: the requested ones, else those with training data (and, when --languages
        is given, both sides among those languages)."""
        requested = _comma_list(option)
        with_para = self._listed(self.cfg.train_subset, "para")
        self._check_requested("--pairs", "pair", requested, self.manifest_pairs,
                              with_para if self.tlm_share > 0 else None, "")
        if requested:
            return requested
        pairs = [p for p in self.manifest_pairs if with_para is None or p in with_para]
        if languages_given:
            pairs = [
                p for p in pairs
                if all(lang in self.languages for lang in split_pair(p, self.manifest_languages))
            ]
        return pairs

    def _build_masker(self, cfg: MlmTlmConfig) -> TokenMasker:
        d = self.dictionary
        # fairseq pads dictionaries with never-seen "madeupword" entries; keep them out of
        # the random replacements
        regular = [
            i for i in range(d.nspecial, len(d))
            if i != self.mask_idx and not d[i].startswith("madeupword")
        ]
        return TokenMasker(
            mask_idx=self.mask_idx,
            pad_idx=d.pad(),
            never_mask=[d.bos(), d.pad(), d.eos(), d.unk(), self.mask_idx],
            random_token_ids=np.asarray(regular, dtype=np.int64),
            mask_prob=cfg.mask_prob,
            leave_unmasked_prob=cfg.leave_unmasked_prob,
            random_token_prob=cfg.random_token_prob,
            word_starts=word_start_table(d.symbols, d.nspecial) if cfg.mask_whole_words else None,
        )

    # ---- datasets ------------------------------------------------------------------

    def _load_lines(self, relpath: str, split: str, what: str):
        """One binarized line dataset, checked without reading it: the .bin holds exactly the
        bytes its .idx describes, and, where the manifest records them (format_version 2),
        the item count, byte size and largest id match and the id fits the dictionary."""
        path = os.path.join(self.cfg.data, relpath)
        bin_path, idx_path = path + ".bin", path + ".idx"
        for missing in (idx_path, bin_path):
            if not os.path.isfile(missing):
                raise MissingDataError(missing, f"is missing ('{split}' data for {what})")
        bin_bytes = os.path.getsize(bin_path)
        if bin_bytes == 0:  # checked first: an empty file cannot even be memory-mapped
            raise DataError(bin_path, f"is empty ('{split}' data for {what})")
        try:
            lines = indexed_dataset.MMapIndexedDataset(path)
            index = lines._index  # (pointer, size) per item, from the .idx alone
            expected = int(index[len(index) - 1][0]) + int(index[len(index) - 1][1]) * index.dtype().itemsize \
                if len(index) else 0
        except Exception as e:
            raise DataError(idx_path, f"cannot be read as a fairseq mmap index ({e})") from None
        if len(lines) == 0:
            raise DataError(bin_path, f"holds no item ('{split}' data for {what})")
        if bin_bytes != expected:
            raise DataError(
                bin_path, f"is {bin_bytes} bytes but its .idx describes {expected} ({len(lines)} "
                "items): the file is cut short or belongs to other data; re-run data-prep/binarize.py"
            )
        if self.manifest_files is None:  # an older manifest: documented in docs/CONTRACTS.md
            return IdCheckedLines(lines, bin_path, self._dictionary_path, len(self.dictionary) - 1)
        self._check_recorded(relpath, bin_path, len(lines), bin_bytes)
        return lines

    def _check_recorded(self, relpath: str, bin_path: str, items: int, bin_bytes: int) -> None:
        """Compare a dataset file with what binarize.py recorded for it in the manifest."""
        record = self.manifest_files.get(relpath)
        if not isinstance(record, dict):
            raise DataError(bin_path, f"is not listed under 'files' in {self._manifest_path}")
        for key, actual in (("items", items), ("bin_bytes", bin_bytes)):
            if key in record and record[key] != actual:
                raise DataError(
                    bin_path, f"has {actual} {key.replace('_', ' ')} but {self._manifest_path} "
                    f"records {record[key]}: the file was replaced or damaged; re-run data-prep/binarize.py"
                )
        max_id = record.get("max_id")
        vocabulary = len(self.dictionary) - 1  # without the <mask> the task appended
        if isinstance(max_id, int) and max_id >= vocabulary:
            raise DataError(
                self._dictionary_path, f"has {vocabulary} entries (specials included), but "
                f"{bin_path} holds ids up to {max_id}: this dictionary is shorter than the one the "
                "data was binarized with; restore it or re-run data-prep/binarize.py"
            )

    def _mono_corpora(self, split: str, languages: List[str]) -> List[MonolingualBlockDataset]:
        d = self.dictionary
        return [
            MonolingualBlockDataset(
                self._load_lines(os.path.join("mono", lang, split), split, f"language '{lang}'"),
                lang_id=self.manifest_languages.index(lang),
                bos=d.bos(), pad=d.pad(), eos=d.eos(),
                max_tokens=self.cfg.tokens_per_sample,
            )
            for lang in languages
        ]

    def _pair_corpora(self, split: str, pairs: List[str]) -> List[ParallelPairDataset]:
        corpora = []
        for pair in pairs:
            src, tgt = split_pair(pair, self.manifest_languages)
            side = {
                lang: self._load_lines(
                    os.path.join("para", pair, f"{split}.{lang}"), split, f"pair '{pair}'"
                )
                for lang in (src, tgt)
            }
            corpora.append(
                ParallelPairDataset(
                    side[src], side[tgt],
                    src_lang_id=self.manifest_languages.index(src),
                    tgt_lang_id=self.manifest_languages.index(tgt),
                    bos=self.dictionary.bos(), eos=self.dictionary.eos(),
                    max_tokens=self.cfg.tokens_per_sample,
                )
            )
        return corpora

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs) -> None:
        """Training split: "mlm"/"tlm" groups, re-balanced by alpha. Other splits: a group per
        language and per pair that the manifest records data for, every sample once."""
        languages = self.languages if self.mlm_share > 0 else []
        pairs = self.pairs if self.tlm_share > 0 else []
        if split == self.cfg.train_subset:
            alpha, seed = self.cfg.multilang_sampling_alpha, self.cfg.seed
            groups, ratio = [], []
            if languages:
                corpora = self._mono_corpora(split, languages)
                groups.append((MLM_GROUP, resample_by_alpha(corpora, alpha, seed, epoch, stream=0)))
                ratio.append(self.mlm_share)
            if pairs:
                corpora = self._pair_corpora(split, pairs)
                groups.append((TLM_GROUP, resample_by_alpha(corpora, alpha, seed, epoch, stream=1)))
                ratio.append(self.tlm_share)
        else:
            listed_mono, listed_para = self._listed(split, "mono"), self._listed(split, "para")
            eval_languages = [x for x in languages if listed_mono is None or x in listed_mono]
            eval_pairs = [p for p in pairs if listed_para is None or p in listed_para]
            left_out = sorted(set(languages + pairs) - set(eval_languages + eval_pairs))
            if left_out:
                logger.info(f"{TASK_NAME}: the manifest has no '{split}' data for {left_out}")
            if not eval_languages and not eval_pairs:
                raise ValueError(
                    f"{TASK_NAME}: {self._manifest_path} records no '{split}' data for the "
                    f"languages {languages} or pairs {pairs}; leave '{split}' out of "
                    "--valid-subset or pass --disable-validation"
                )
            groups = list(zip(eval_languages, self._mono_corpora(split, eval_languages)))
            groups += list(zip(eval_pairs, self._pair_corpora(split, eval_pairs)))
            ratio = None
        self.datasets[split] = GroupedMaskedDataset(
            groups, self.masker, self.dictionary.pad(), seed=self.cfg.seed, batch_ratio=ratio
        )
        logger.info(
            f"{TASK_NAME}: split '{split}': "
            + ", ".join(f"{name} {len(ds)}" for name, ds in groups)
            + " samples"
        )

    def get_batch_iterator(
        self,
        dataset,
        max_tokens=None,
        max_sentences=None,
        max_positions=None,
        ignore_invalid_inputs=False,
        required_batch_size_multiple=1,
        seed=1,
        num_shards=1,
        shard_id=0,
        num_workers=0,
        epoch=1,
        data_buffer_size=0,
        disable_iterator_cache=False,
        skip_remainder_batch=False,
        grouped_shuffling=False,
        update_epoch_batch_itr=False,
    ) -> iterators.EpochBatchIterator:
        """fairseq's iterator over batches that `GroupedMaskedDataset.make_batches` orders.

        The batch order is a function of (seed, epoch) and already shuffled, so the
        iterator must not shuffle again (that would break the MLM/TLM cycles); it is
        rebuilt every epoch, as fairseq does for datasets that resample. Its checkpoint
        state holds the epoch's global position (xmoe/data/epoch_position.py).
        """
        if not isinstance(dataset, GroupedMaskedDataset):
            return super().get_batch_iterator(
                dataset, max_tokens, max_sentences, max_positions, ignore_invalid_inputs,
                required_batch_size_multiple, seed, num_shards, shard_id, num_workers, epoch,
                data_buffer_size, disable_iterator_cache, skip_remainder_batch,
                grouped_shuffling, update_epoch_batch_itr,
            )
        dataset.set_epoch(epoch)
        # everything the batches depend on besides (seed, epoch): recorded in checkpoints so
        # that a run resumed with other values continues at the same global position
        batching = dict(
            seed=int(seed), max_tokens=None if max_tokens is None else int(max_tokens),
            max_sentences=None if max_sentences is None else int(max_sentences),
            max_positions=size_limit(max_positions), ignore_invalid_inputs=bool(ignore_invalid_inputs),
            required_batch_size_multiple=int(required_batch_size_multiple), num_shards=int(num_shards),
        )
        return ElasticEpochBatchIterator(
            dataset,
            batching,
            num_shards=num_shards,
            shard_id=shard_id,
            epoch=epoch,
            log_prefix=TASK_NAME,
            seed=seed,
            num_workers=num_workers,
            buffer_size=data_buffer_size,
            disable_shuffling=True,
            skip_remainder_batch=skip_remainder_batch,
            # NOTE: a fresh DataLoader per epoch, so that worker processes see the
            # dataset's new epoch (resampling, masks) instead of a stale copy
            reuse_dataloader=False,
            persistent_workers=False,
        )

    # ---- steps and metrics ---------------------------------------------------------

    def _add_group_logs(self, sample: Dict[str, Any], logging_output: Dict[str, Any]) -> None:
        """Copy the batch's loss under its group's keys, zeros under every other group.

        Every worker must emit the same keys: fairseq sums logging outputs across
        workers key by key, and workers hold batches of different groups.
        """
        group = sample.get("group") if sample else None
        nll_key = next((k for k in CRITERION_NLL_KEYS if k in logging_output), None)
        loss = float(utils.item(logging_output[nll_key])) if nll_key else 0.0
        size = float(utils.item(logging_output.get("sample_size", 0)))
        for name in self.group_names:
            mine = name == group and nll_key is not None
            logging_output[GROUP_LOSS_KEY.format(name)] = loss if mine else 0.0
            logging_output[GROUP_SIZE_KEY.format(name)] = size if mine else 0.0

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        loss, sample_size, logging_output = super().train_step(
            sample, model, criterion, optimizer, update_num, ignore_grad
        )
        self._add_group_logs(sample, logging_output)
        return loss, sample_size, logging_output

    def valid_step(self, sample, model, criterion):
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        self._add_group_logs(sample, logging_output)
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion) -> None:
        """The criterion's metrics, plus loss_{group} (base 2) and ppl_{group} per group seen."""
        super().reduce_metrics(logging_outputs, criterion)
        for name in self.group_names:
            size = sum(float(log.get(GROUP_SIZE_KEY.format(name), 0)) for log in logging_outputs)
            if size <= 0:
                continue
            loss = sum(float(log.get(GROUP_LOSS_KEY.format(name), 0)) for log in logging_outputs)
            metrics.log_scalar(f"loss_{name}", loss / size / math.log(2), size, round=3)
            metrics.log_derived(
                f"ppl_{name}",
                lambda meters, key=f"loss_{name}": utils.get_perplexity(meters[key].avg),
            )

    # ---- properties ----------------------------------------------------------------

    def max_positions(self) -> int:
        return self.cfg.tokens_per_sample

    @property
    def num_languages(self) -> int:
        """Size of the language-id vocabulary (all manifest languages)."""
        return len(self.manifest_languages)

    @property
    def source_dictionary(self) -> Dictionary:
        return self.dictionary

    @property
    def target_dictionary(self) -> Dictionary:
        return self.dictionary
