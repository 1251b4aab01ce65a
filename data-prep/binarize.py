#!/usr/bin/env python3
"""Encode a RAW corpus with a sentencepiece model into fairseq mmap datasets.

Input: the RAW layout of docs/CONTRACTS.md (from fetch_libreoffice.py, or CC-100 / OPUS text
arranged the same way), a sentencepiece model and its fairseq dict.txt (from train_spm.py).
Output (docs/CONTRACTS.md):

    DATA/manifest.json
    DATA/dict.txt  DATA/spm.model                 copies of the inputs
    DATA/mono/{lang}/{split}.bin/.idx             one item per non-blank line
    DATA/para/{src}-{tgt}/{split}.{lang}.bin/.idx one item per pair with two non-blank sides

Each item is the dictionary ids of the line's pieces followed by </s>, as fairseq-preprocess
writes them; pieces missing from the dictionary become <unk> (counted and reported).

Every input is checked before anything is written; DATA is built in a temporary folder beside it
and renamed into place at the end, so an interrupted run leaves no half-written dataset.
The output is byte-identical for any --workers.
"""
from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prep_common import (  # noqa: E402
    EXIT_FAILURE, SPLITS, DataPrepError, check_dict_matches_spm, check_mono, check_output_folder,
    check_para, check_train_text, format_table, iter_mono, iter_para, log, parse_lang_list,
    run_cli, scan_raw, select_languages, staged_folder)

# 2: manifest.json also records the dictionary size and, per dataset file, its items, .bin bytes
# and largest id, which the task checks at load time (docs/CONTRACTS.md)
FORMAT_VERSION = 2
# Lines per unit of work: big enough to amortise the inter-process hand-off, small enough to
# keep both cores busy on a corpus of a few files.
DEFAULT_CHUNK_LINES = 2000


@dataclass
class OutputFile:
    """One dataset to write: its path stem under DATA and where its lines come from."""
    stem: str             # e.g. "mono/en/train" or "para/en-de/train.de"
    sources: tuple[Path, ...]  # (mono file,) or (src file, tgt file)
    side: int             # which file of a pair this dataset holds (0 for mono)
    n_items: int          # counted by the validation pass

    def lines(self) -> Iterator[str]:
        """The lines that become items, re-read from disk (the corpus need not fit in memory)."""
        if len(self.sources) == 1:
            return iter_mono(self.sources[0])
        return (pair[self.side] for pair in iter_para(*self.sources))


# ----------------------------------------------------------------------------------------------
# Encoding (runs in worker processes; state is set once per process by _init_worker)
# ----------------------------------------------------------------------------------------------
_processor = None
_piece_to_dict: np.ndarray | None = None  # spm piece id -> fairseq dictionary id
_eos = 2


def _init_worker(spm_path: str, piece_to_dict: np.ndarray, eos: int) -> None:
    global _processor, _piece_to_dict, _eos
    import sentencepiece as spm

    _processor = spm.SentencePieceProcessor(model_file=spm_path)
    _piece_to_dict, _eos = piece_to_dict, eos


def _encode_chunk(lines: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(flat ids of every item, item lengths) for a chunk of lines, each item ending in eos."""
    ids_per_line = _processor.encode(lines)
    sizes = np.fromiter((len(ids) + 1 for ids in ids_per_line), dtype=np.int64,
                        count=len(ids_per_line))
    flat = np.zeros(int(sizes.sum()), dtype=np.int64)
    ends = np.cumsum(sizes)
    for ids, end in zip(ids_per_line, ends):
        flat[end - len(ids) - 1: end - 1] = ids
    flat = _piece_to_dict[flat]  # map spm ids (eos slots hold 0 here) ...
    flat[ends - 1] = _eos        # ... then put eos at the end of every item
    return flat, sizes


def _ordered_in_flight(pool, chunks: Iterator[list[str]], window: int,
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pool.imap keeping at most `window` chunks in flight: Pool.imap would read the whole
    corpus into its queue ahead of the writer, which a CC-100-sized corpus does not survive."""
    pending: collections.deque = collections.deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_encode_chunk, (chunk,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _chunks(outputs: list[OutputFile], chunk_lines: int) -> Iterator[list[str]]:
    """Consecutive chunks of `chunk_lines` lines of every output, in order (a chunk never spans
    two outputs); items are encoded line by line, so the result depends on neither the chunk
    size nor the number of workers."""
    for output in outputs:
        chunk: list[str] = []
        for line in output.lines():
            chunk.append(line)
            if len(chunk) == chunk_lines:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


# ----------------------------------------------------------------------------------------------
# Planning: read and check every input before any output exists
# ----------------------------------------------------------------------------------------------
def plan_outputs(raw: Path, langs_wanted: list[str] | None,
                 ) -> tuple[list[str], list[str], list[OutputFile], dict, list[str]]:
    """Read and validate the whole RAW corpus. Returns (languages, pairs, outputs, sizes,
    notes) where sizes follows manifest.json's "sizes"."""
    corpus = scan_raw(raw)
    langs = select_languages(corpus, langs_wanted)
    corpus = corpus.restrict(langs)
    check_train_text(corpus, langs)  # as train_spm.py does: a language must have train text
    order = {lang: i for i, lang in enumerate(langs)}
    pairs = sorted(corpus.pairs, key=lambda p: (order[p[0]], order[p[1]]))
    outputs: list[OutputFile] = []
    sizes: dict = {split: {"mono": {}, "para": {}} for split in SPLITS}
    notes: list[str] = []
    for split in SPLITS:
        for lang in langs:
            path = corpus.mono.get((lang, split))
            if path is None:
                continue
            kept, blank = check_mono(path)
            if blank:
                notes.append(f"{path}: skipped {blank} blank lines")
            outputs.append(OutputFile(f"mono/{lang}/{split}", (path,), 0, kept))
            sizes[split]["mono"][lang] = kept
        for src, tgt in pairs:
            files = corpus.para.get((src, tgt, split))
            if files is None:
                continue
            kept, dropped = check_para(*files)
            if dropped:
                notes.append(f"{files[0]} / {files[1]}: dropped {dropped} pairs with a blank side")
            outputs.append(OutputFile(f"para/{src}-{tgt}/{split}.{src}", files, 0, kept))
            outputs.append(OutputFile(f"para/{src}-{tgt}/{split}.{tgt}", files, 1, kept))
            sizes[split]["para"][f"{src}-{tgt}"] = kept
    if not any(sizes["train"][kind] for kind in ("mono", "para")):
        raise DataPrepError(f"no train split in {raw}: expected e.g. {raw}/mono/"
                            f"{langs[0]}.train.txt")
    return langs, [f"{s}-{t}" for s, t in pairs], outputs, sizes, notes


def piece_to_dict_ids(processor, dictionary) -> tuple[np.ndarray, int]:
    """Lookup table spm id -> dictionary id, and how many ordinary pieces the dict lacks."""
    table = np.empty(processor.get_piece_size(), dtype=np.int64)
    missing = 0
    for piece_id in range(processor.get_piece_size()):
        index = dictionary.index(processor.id_to_piece(piece_id))
        table[piece_id] = index
        ordinary = not (processor.is_control(piece_id) or processor.is_unknown(piece_id)
                        or processor.is_unused(piece_id))
        missing += ordinary and index == dictionary.unk()
    table[processor.unk_id()] = dictionary.unk()
    return table, missing


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python data-prep/binarize.py --raw cache/raw --spm-model "
               "cache/spm/spm.model --dict cache/spm/dict.txt --out cache/data-bin --workers 2")
    parser.add_argument("--raw", type=Path, required=True, help="RAW corpus folder")
    parser.add_argument("--spm-model", type=Path, required=True, help="sentencepiece model")
    parser.add_argument("--dict", type=Path, required=True,
                        help="fairseq dict.txt made for --spm-model")
    parser.add_argument("--out", type=Path, required=True, help="DATA folder to write")
    parser.add_argument("--langs", nargs="+", metavar="LANG",
                        help="languages to binarize, in manifest order (= language ids); "
                             "default: every language in RAW, en first, then sorted")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="encoding processes (default: number of CPUs, %(default)s)")
    parser.add_argument("--chunk-lines", type=int, default=DEFAULT_CHUNK_LINES,
                        help="lines per unit of work handed to a worker (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="replace an output folder that already holds data")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1 or args.chunk_lines < 1:
        raise DataPrepError("--workers and --chunk-lines must be >= 1")
    started = time.time()
    # Everything that can be wrong with the inputs is found here, before any output is touched.
    check_output_folder(args.out, args.force, "a binarized dataset")
    processor, _ = check_dict_matches_spm(args.spm_model, args.dict)
    langs, pairs, outputs, sizes, notes = plan_outputs(args.raw, parse_lang_list(args.langs))
    for note in notes:
        log(f"note: {note}")
    checked = time.time()

    # fairseq takes seconds to import, so only after the inputs passed.
    import torch
    from fairseq.data import Dictionary
    from fairseq.data.indexed_dataset import make_builder

    dictionary = Dictionary.load(str(args.dict))
    piece_to_dict, missing = piece_to_dict_ids(processor, dictionary)
    if missing:
        log(f"note: {missing} pieces of {args.spm_model} are not in {args.dict}; "
            f"they become <unk>")

    n_tokens = n_unk = 0
    files: dict[str, dict[str, int]] = {}  # manifest "files": what the task checks at load time
    with staged_folder(args.out) as staging:
        init_args = (str(args.spm_model), piece_to_dict, dictionary.eos())
        pool = None
        if args.workers > 1:
            pool = multiprocessing.get_context("fork").Pool(
                args.workers, initializer=_init_worker, initargs=init_args)
            encoded = _ordered_in_flight(pool, _chunks(outputs, args.chunk_lines),
                                         window=4 * args.workers)
        else:
            _init_worker(*init_args)
            encoded = map(_encode_chunk, _chunks(outputs, args.chunk_lines))
        try:
            for output in outputs:
                target = staging / output.stem
                target.parent.mkdir(parents=True, exist_ok=True)
                builder = make_builder(f"{target}.bin", impl="mmap", vocab_size=len(dictionary))
                written = max_id = 0
                while written < output.n_items:
                    flat, item_sizes = next(encoded, (None, None))
                    if flat is None:
                        break
                    written += len(item_sizes)
                    max_id = max(max_id, int(flat.max()))
                    n_tokens += len(flat)
                    n_unk += int((flat == dictionary.unk()).sum())
                    for item in np.split(flat, np.cumsum(item_sizes)[:-1]):
                        builder.add_item(torch.from_numpy(item))
                if written != output.n_items:
                    raise DataPrepError(
                        f"{', '.join(map(str, output.sources))} changed while being binarized "
                        f"({output.n_items} items expected, {written} read); nothing was "
                        f"published", EXIT_FAILURE)
                builder.finalize(f"{target}.idx")
                files[output.stem] = {"items": written, "bin_bytes": os.path.getsize(f"{target}.bin"),
                                      "max_id": max_id}
        finally:
            if pool is not None:
                pool.terminate()
        shutil.copyfile(args.dict, staging / "dict.txt")
        shutil.copyfile(args.spm_model, staging / "spm.model")
        manifest = {"format_version": FORMAT_VERSION, "languages": langs, "pairs": pairs,
                    "spm_model": "spm.model", "dictionary": "dict.txt",
                    "dictionary_size": len(dictionary), "sizes": sizes, "files": files}
        # Written last: a DATA folder with a manifest is complete.
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    rows = [["data", "train", "valid", "test"]]
    for kind, names in (("mono", langs), ("para", pairs)):
        for name in names:
            cells = [str(sizes[s][kind].get(name, "-")) for s in SPLITS]
            if any(c != "-" for c in cells):
                rows.append([f"{kind} {name}", *cells])
    log(format_table(rows))
    log(f"wrote {args.out}: {len(outputs)} datasets, {n_tokens} tokens incl. </s>, "
        f"<unk> {100 * n_unk / max(n_tokens, 1):.3f}% (checks {checked - started:.1f}s, "
        f"total {time.time() - started:.1f}s, {args.workers} workers)")
    return 0


if __name__ == "__main__":
    run_cli(main)
