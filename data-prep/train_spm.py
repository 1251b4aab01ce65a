#!/usr/bin/env python3
"""Train a sentencepiece model on a RAW corpus and write the matching fairseq dict.txt.

Training text is the train split of every language (its mono file and its side of every pair),
sampled per language so that small languages are not drowned out by large ones:

    lines of language i  =  total * n_i**alpha / sum_j n_j**alpha
    total                =  --sentences-per-language * number of languages

alpha = 0 (the default) gives every language the same number of lines; alpha = 1 samples in
proportion to the data; XLM-R used 0.3. A language with fewer distinct lines than its share is
oversampled (its lines repeated), which is what balancing means for a frequency-based tokenizer.

Writes OUT/spm.model, OUT/spm.vocab, OUT/dict.txt (every piece except sentencepiece's <unk> <s>
</s>, in model order, with its count in the training sample; fairseq adds <s> <pad> </s> <unk>
itself) and OUT/spm_info.json.

With --spm-model and --dict (for instance XLM-R's sentencepiece.bpe.model and dict.txt) nothing is
trained: the pair is checked (every dict entry must be a piece of the model) and, with --out,
copied to OUT/spm.model and OUT/dict.txt.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prep_common import (  # noqa: E402
    DataPrepError, check_dict_matches_spm, check_output_folder, check_train_text, format_table,
    is_blank, log, iter_lines, parse_lang_list, run_cli, scan_raw, select_languages,
    staged_folder)


def read_train_text(files: list[Path]) -> list[str]:
    """Distinct non-blank lines of the files, in first-seen order (deterministic)."""
    seen: dict[str, None] = {}
    for path in files:
        for line in iter_lines(path):
            if not is_blank(line):
                seen.setdefault(line.strip(), None)
    return list(seen)


def lines_per_language(available: dict[str, int], per_language: int, alpha: float,
                       ) -> dict[str, int]:
    """Alpha-smoothed share of the sampling budget for each language (see the module doc)."""
    weights = {lang: n ** alpha for lang, n in available.items()}
    total_weight = sum(weights.values())
    budget = per_language * len(available)
    return {lang: max(1, round(budget * w / total_weight)) for lang, w in weights.items()}


def sample_lines(lines: list[str], count: int, rng: random.Random) -> list[str]:
    """`count` lines: a sample without repetition when there are enough, else all of them
    plus random repeats."""
    if count <= len(lines):
        return rng.sample(lines, count)
    return lines + rng.choices(lines, k=count - len(lines))


def write_fairseq_dict(processor, sample: list[str], path: Path) -> int:
    """dict.txt with every ordinary piece of the model and its count in `sample`."""
    counts: Counter[int] = Counter()
    for ids in processor.encode(sample):
        counts.update(ids)
    written = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for piece_id in range(processor.get_piece_size()):
            if processor.is_control(piece_id) or processor.is_unknown(piece_id) \
                    or processor.is_unused(piece_id):
                continue
            piece = processor.id_to_piece(piece_id)
            if any(ch.isspace() for ch in piece):  # fairseq splits dict lines on spaces
                raise DataPrepError(f"sentencepiece produced a piece with whitespace: {piece!r}")
            f.write(f"{piece} {counts[piece_id]}\n")
            written += 1
    return written


def training_error_message(error: str, args: argparse.Namespace) -> str:
    """sentencepiece's error, said with this tool's option names. Its own text reads like
    "INTERNAL: src/trainer_interface.cc(744) [...] Vocabulary size too high (50000). Please set
    it to a value <= 88." and names its own options (vocab_size, --character_coverage)."""
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", error)
    if too_high:
        return (f"--vocab-size {too_high[1]} is too large: this training text yields at most "
                f"{too_high[2]} pieces; pass --vocab-size {too_high[2]} or less, or give it more "
                "text (--sentences-per-language, more languages or data)")
    too_few = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", error)
    if too_few:
        return (f"--vocab-size {too_few[1]} is too small: the {too_few[2]} distinct characters kept "
                f"by --character-coverage {args.character_coverage} each need a piece (plus "
                f"sentencepiece's special pieces); raise --vocab-size above {too_few[2]} or lower "
                "--character-coverage")
    detail = re.sub(r"^\w+: \S+\.cc\(\d+\) \[.*?\] ", "", error)  # its source location
    detail = detail.replace("--character_coverage", "--character-coverage").replace(
        "vocab_size", "--vocab-size")
    return f"sentencepiece training failed: {detail}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python data-prep/train_spm.py --raw cache/raw --out cache/spm --vocab-size 8000\n"
               "  python data-prep/train_spm.py --spm-model xlmr/sentencepiece.bpe.model "
               "--dict xlmr/dict.txt --out cache/spm")
    parser.add_argument("--raw", type=Path, help="RAW corpus folder (docs/CONTRACTS.md)")
    parser.add_argument("--out", type=Path,
                        help="folder for spm.model, spm.vocab, dict.txt, spm_info.json "
                             "(required when training)")
    parser.add_argument("--force", action="store_true",
                        help="replace an output folder that already holds data")
    parser.add_argument("--langs", nargs="+", metavar="LANG",
                        help="languages to train on (default: every language in RAW)")
    parser.add_argument("--vocab-size", type=int, default=8000,
                        help="number of pieces (default: %(default)s)")
    parser.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram",
                        help="sentencepiece algorithm (default: %(default)s)")
    parser.add_argument("--character-coverage", type=float, default=0.9995,
                        help="share of characters covered by the pieces; below 1 so rare CJK "
                             "characters become <unk> instead of crowding out pieces "
                             "(default: %(default)s)")
    parser.add_argument("--sentences-per-language", type=int, default=10000,
                        help="sampling budget per language; caps training time "
                             "(default: %(default)s)")
    parser.add_argument("--sampling-alpha", type=float, default=0.0,
                        help="0 = equal lines per language, 1 = proportional to data "
                             "(default: %(default)s)")
    parser.add_argument("--seed-pieces", type=int, default=50000,
                        help="unigram only: candidate pieces the model starts from before "
                             "pruning to --vocab-size; sentencepiece's default (1M) costs "
                             "several times the training time for <1%% fewer tokens on the "
                             "LibreOffice corpus (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="sampling seed (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="sentencepiece trainer threads (default: %(default)s)")
    parser.add_argument("--spm-model", type=Path,
                        help="use this existing sentencepiece model instead of training one")
    parser.add_argument("--dict", type=Path,
                        help="the fairseq dict.txt that goes with --spm-model")
    return parser


def use_existing(args: argparse.Namespace) -> int:
    if args.spm_model is None or args.dict is None:
        raise DataPrepError("--spm-model and --dict go together")
    if args.out is not None:
        check_output_folder(args.out, args.force, "a sentencepiece model")
    processor, entries = check_dict_matches_spm(args.spm_model, args.dict)
    log(f"ok: all {len(entries)} entries of {args.dict} are pieces of {args.spm_model} "
        f"({processor.get_piece_size()} pieces)")
    if args.out is not None:
        with staged_folder(args.out) as staging:
            shutil.copyfile(args.spm_model, staging / "spm.model")
            shutil.copyfile(args.dict, staging / "dict.txt")
        log(f"copied to {args.out}/spm.model and {args.out}/dict.txt")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.spm_model is not None or args.dict is not None:
        return use_existing(args)
    if args.raw is None or args.out is None:
        raise DataPrepError("training needs --raw and --out (or give --spm-model and --dict)")
    if args.vocab_size < 10 or args.sentences_per_language < 1 or args.sampling_alpha < 0:
        raise DataPrepError("need --vocab-size >= 10, --sentences-per-language >= 1, "
                            "--sampling-alpha >= 0")
    started = time.time()
    check_output_folder(args.out, args.force, "a sentencepiece model")
    corpus = scan_raw(args.raw)
    langs = select_languages(corpus, parse_lang_list(args.langs))
    check_train_text(corpus, langs)

    texts: dict[str, list[str]] = {}
    for lang in langs:
        files = corpus.train_files(lang)
        texts[lang] = read_train_text(files)
        if not texts[lang]:
            raise DataPrepError(
                f"empty language file: no non-blank train line for {lang} in "
                f"{', '.join(map(str, files))}")
    shares = lines_per_language({l: len(t) for l, t in texts.items()},
                                args.sentences_per_language, args.sampling_alpha)
    rng = random.Random(args.seed)
    sample: list[str] = []
    for lang in langs:
        sample.extend(sample_lines(texts[lang], shares[lang], rng))
    rng.shuffle(sample)
    rows = [["language", "distinct train lines", "sampled"]]
    rows += [[lang, str(len(texts[lang])), str(shares[lang])] for lang in langs]
    log(format_table(rows))

    import sentencepiece as spm

    with staged_folder(args.out) as staging:
        log(f"training a {args.model_type} sentencepiece model, vocab {args.vocab_size}, "
            f"on {len(sample)} lines ...")
        extra = {"seed_sentencepiece_size": args.seed_pieces} \
            if args.model_type == "unigram" else {}
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sample), model_prefix=str(staging / "spm"),
                vocab_size=args.vocab_size, model_type=args.model_type,
                character_coverage=args.character_coverage, num_threads=args.threads,
                input_sentence_size=0, minloglevel=2, **extra)
        except RuntimeError as err:
            raise DataPrepError(training_error_message(str(err), args)) from None
        processor = spm.SentencePieceProcessor(model_file=str(staging / "spm.model"))
        n_entries = write_fairseq_dict(processor, sample, staging / "dict.txt")
        info = {"languages": langs, "distinct_train_lines": {l: len(t) for l, t in texts.items()},
                "sampled_lines": shares, "vocab_size": args.vocab_size,
                "model_type": args.model_type, "character_coverage": args.character_coverage,
                "sampling_alpha": args.sampling_alpha, "seed": args.seed,
                "seed_pieces": args.seed_pieces,
                "dict_entries": n_entries}
        (staging / "spm_info.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"wrote {args.out}/spm.model and {args.out}/dict.txt ({n_entries} entries) "
        f"in {time.time() - started:.1f}s")
    return 0


if __name__ == "__main__":
    run_cli(main)
