#!/usr/bin/env python3
"""Build a zero-shot cross-lingual topic classification task from the LibreOffice help pages.

Every help page belongs to the LibreOffice module named by its path,
`help/<lang>/text/<module>/...html`, module in sbasic, scalc, schart, sdatabase, sdraw, shared,
simpress, smath, swriter, and the same page exists in every language. The task: given a page's
text, name its module. Fine-tune on English, test on every language (English included, as the
in-language reference).

Unit: one example per PAGE, its text being the page's paragraphs in document order (title
first), cut to --max-words words (scripts without spaces: 2 characters count as a word). A
single paragraph ("Click OK.") often names no module at all; a page's title and first lines do,
and one example per page keeps the languages comparable (the same pages everywhere).

Split BY PAGE: a stable hash of the page path puts each page in train, dev or test, the same in
every language, so no test page's English version is in train or dev. A dev/test page whose
English text equals that of a train page (the help repeats some pages in several modules) is
dropped, so an identical text cannot be learnt under one label and tested under another.
Untranslated paragraphs (identical to the English paragraph with the same id) are left out of
the other languages' pages; a page with fewer than --min-words words left is skipped in that
language.

    OUT/en.train.tsv, OUT/en.dev.tsv      English training and model-selection data
    OUT/{lang}.test.tsv                   test pages of every language (en included)
    OUT/manifest.json                     labels, sizes and label counts per file, options
    OUT/pages.json                        the page path of every row, file by file

TSV rows are `label<TAB>text` after a `label<TAB>text` header, the format `xmoe-finetune`
reads. Rows are ordered by the hash of their page path, so the first N rows of a label are a
random-like sample of it (what `xmoe-analyze transfer --max-train-per-class` takes).

The packages come from the cache that fetch_libreoffice.py fills (downloaded with
`apt-get download` only when missing; --offline never calls apt).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_libreoffice import (  # noqa: E402
    CJK_CHARS_PER_WORD, DEFAULT_LANGS, ensure_unpacked, lang_for_package, load_paragraphs,
    package_for, split_of, word_equivalents)
from prep_common import (  # noqa: E402
    DataPrepError, check_output_folder, format_table, is_unspaced_script, log, parse_lang_list,
    run_cli, staged_folder)

MODULES = ("sbasic", "scalc", "schart", "sdatabase", "sdraw", "shared", "simpress", "smath",
           "swriter")
TRAIN_LANGUAGE = "en"
SPLIT_NAMES = {"train": "train", "valid": "dev", "test": "test"}  # split_of's names -> ours
TSV_HEADER = "label\ttext"


def module_of(page: str) -> str | None:
    """The module of a page path relative to the language folder (text/scalc/01/x.html)."""
    parts = page.split("/")
    if len(parts) >= 3 and parts[0] == "text" and parts[1] in MODULES:
        return parts[1]
    return None


def pages_of(paragraphs: dict[str, str]) -> dict[str, list[tuple[str, str]]]:
    """{page path: [(paragraph id, text), ...] in document order} from {'page#id': text}."""
    pages: dict[str, list[tuple[str, str]]] = {}
    for key, text in paragraphs.items():
        page, _, par_id = key.partition("#")
        pages.setdefault(page, []).append((par_id, text))
    return pages


def cut_to_words(texts: Sequence[str], lang: str, max_words: int) -> str:
    """The texts joined by spaces, cut after max_words words (characters / CJK_CHARS_PER_WORD
    for scripts without spaces)."""
    if is_unspaced_script(lang):
        budget = int(max_words * CJK_CHARS_PER_WORD)
        kept: list[str] = []
        for char in " ".join(texts):
            if budget <= 0:
                break
            kept.append(char)
            budget -= not char.isspace()
        return "".join(kept).strip()
    return " ".join(" ".join(texts).split()[:max_words])


def page_hash(page: str) -> str:
    return hashlib.sha1(page.encode("utf-8")).hexdigest()


def build_task(paragraphs: dict[str, dict[str, str]], langs: list[str], *, dev_percent: float,
               test_percent: float, max_words: int, min_words: int) -> dict:
    """Examples per file from {lang: {'page#id': text}} (see the module doc).

    Returns {"train": rows, "dev": rows, "test": {lang: rows}, "dropped": {...}}, each row a
    (page, label, text) triple, rows ordered by page_hash."""
    english = paragraphs[TRAIN_LANGUAGE]
    english_pages = {page: pars for page, pars in pages_of(english).items() if module_of(page)}
    texts: dict[str, dict[str, str]] = {}  # lang -> page -> cut text
    too_short: dict[str, int] = {}
    for lang in langs:
        by_page = english_pages if lang == TRAIN_LANGUAGE else pages_of(paragraphs[lang])
        texts[lang] = {}
        too_short[lang] = 0
        for page in english_pages:
            kept = [text for par_id, text in by_page.get(page, [])
                    if lang == TRAIN_LANGUAGE or english.get(f"{page}#{par_id}") != text]
            text = cut_to_words(kept, lang, max_words)
            if word_equivalents(text, lang) >= min_words:
                texts[lang][page] = text
            else:
                too_short[lang] += 1

    split = {page: SPLIT_NAMES[split_of(page, dev_percent, test_percent)] for page in english_pages}
    ordered = sorted(texts[TRAIN_LANGUAGE], key=page_hash)  # pages with a usable English text
    train_pages = [p for p in ordered if split[p] == "train"]
    train_texts = {texts[TRAIN_LANGUAGE][p] for p in train_pages}
    duplicates = {p for p in ordered if split[p] != "train" and texts[TRAIN_LANGUAGE][p] in train_texts}

    def rows(pages: Sequence[str], lang: str) -> list[tuple[str, str, str]]:
        return [(p, module_of(p), texts[lang][p]) for p in pages if p in texts[lang]]

    # A module without a train page cannot be predicted: its held-out pages are left out.
    train_labels = {module_of(p) for p in train_pages}
    unlearnable = {p for p in ordered if module_of(p) not in train_labels}
    held_out = [p for p in ordered if p not in duplicates and p not in unlearnable]
    return {
        "train": rows(train_pages, TRAIN_LANGUAGE),
        "dev": rows([p for p in held_out if split[p] == "dev"], TRAIN_LANGUAGE),
        "test": {lang: rows([p for p in held_out if split[p] == "test"], lang) for lang in langs},
        "dropped": {
            "pages_outside_the_modules": len(pages_of(english)) - len(english_pages),
            "held_out_pages_duplicating_a_train_text": len(duplicates),
            "held_out_pages_of_a_module_without_train_pages": len(unlearnable),
            "too_short": too_short,
        },
    }


def _write_tsv(path: Path, rows: list[tuple[str, str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(TSV_HEADER + "\n")
        for _, label, text in rows:
            f.write(f"{label}\t{text}\n")


def _label_counts(rows: list[tuple[str, str, str]]) -> dict[str, int]:
    counts = Counter(label for _, label, _ in rows)
    return {label: counts[label] for label in MODULES if counts[label]}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python data-prep/build_topic_task.py --cache-dir cache/libreoffice "
               "--out cache/topic --langs en de fr es ru zh-cn")
    parser.add_argument("--langs", nargs="+", default=None, metavar="LANG",
                        help=f"language codes (default: {' '.join(DEFAULT_LANGS)}); English, the "
                             "training language, is always included")
    parser.add_argument("--cache-dir", type=Path, default=Path("cache/libreoffice"),
                        help="package cache of fetch_libreoffice.py (reused; missing packages are "
                             "downloaded unless --offline) (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="task folder to write (created)")
    parser.add_argument("--force", action="store_true",
                        help="replace an output folder that already holds data")
    parser.add_argument("--offline", action="store_true",
                        help="never call apt: fail unless every package is already in the cache")
    parser.add_argument("--dev-percent", type=float, default=10.0,
                        help="percent of pages held out as English dev data (default: %(default)s)")
    parser.add_argument("--test-percent", type=float, default=40.0,
                        help="percent of pages held out as test data, in every language "
                             "(default: %(default)s)")
    parser.add_argument("--max-words", type=int, default=80,
                        help="words of a page kept, from its start (CJK: 2 characters count as "
                             "a word) (default: %(default)s)")
    parser.add_argument("--min-words", type=int, default=5,
                        help="a page with fewer words (after dropping untranslated paragraphs) "
                             "is skipped in that language (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes for parsing HTML when the parse cache is cold "
                             "(default: number of CPUs, %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    langs = parse_lang_list(args.langs) or list(DEFAULT_LANGS)
    langs = [TRAIN_LANGUAGE] + [lang for lang in langs if lang not in (TRAIN_LANGUAGE, "en-us")]
    if not (args.dev_percent > 0 and args.test_percent > 0
            and args.dev_percent + args.test_percent < 100):
        raise DataPrepError("--dev-percent and --test-percent must be > 0 and sum to < 100")
    if not 1 <= args.min_words <= args.max_words:
        raise DataPrepError("need 1 <= --min-words <= --max-words")
    check_output_folder(args.out, args.force, "a topic task")

    folders = ensure_unpacked([package_for(lang) for lang in langs], args.cache_dir, args.offline)
    by_package = load_paragraphs(folders, args.cache_dir, args.workers)
    paragraphs = {lang_for_package(p): pars for p, pars in by_package.items()}
    task = build_task(paragraphs, langs, dev_percent=args.dev_percent,
                      test_percent=args.test_percent, max_words=args.max_words,
                      min_words=args.min_words)
    if not task["train"] or not task["dev"]:
        raise DataPrepError(f"no English train or dev page survived the filters in {args.cache_dir}")
    labels = sorted({label for _, label, _ in task["train"]})
    if len(labels) < 2:
        raise DataPrepError(f"the English train pages cover only the module(s) {labels}: "
                            "nothing to classify")
    empty = [lang for lang in langs if not task["test"][lang]]
    if empty:
        raise DataPrepError(f"no test page survived the filters for {', '.join(empty)} "
                            "(untranslated help?)")

    files = {"train": f"{TRAIN_LANGUAGE}.train.tsv", "dev": f"{TRAIN_LANGUAGE}.dev.tsv",
             "test": {lang: f"{lang}.test.tsv" for lang in langs}}
    with staged_folder(args.out) as staging:
        _write_tsv(staging / files["train"], task["train"])
        _write_tsv(staging / files["dev"], task["dev"])
        for lang in langs:
            _write_tsv(staging / files["test"][lang], task["test"][lang])
        pages = {"train": [p for p, _, _ in task["train"]], "dev": [p for p, _, _ in task["dev"]],
                 "test": {lang: [p for p, _, _ in rows] for lang, rows in task["test"].items()}}
        (staging / "pages.json").write_text(json.dumps(pages, indent=1) + "\n", encoding="utf-8")
        manifest = {
            "task": "topic classification of LibreOffice help pages by module",
            "unit": "page",
            "text": f"the page's paragraphs in document order (title first), cut to "
                    f"{args.max_words} words (CJK: {CJK_CHARS_PER_WORD:g} characters a word); "
                    "untranslated paragraphs left out",
            "labels": labels,
            "train_language": TRAIN_LANGUAGE,
            "languages": langs,
            "files": files,
            "sizes": {"train": len(task["train"]), "dev": len(task["dev"]),
                      "test": {lang: len(rows) for lang, rows in task["test"].items()}},
            "label_counts": {"train": _label_counts(task["train"]),
                             "dev": _label_counts(task["dev"]),
                             "test": {lang: _label_counts(rows)
                                      for lang, rows in task["test"].items()}},
            "split": {"by": "page: sha1 of the page path, the same in every language",
                      "dev_percent": args.dev_percent, "test_percent": args.test_percent},
            "dropped": task["dropped"],
            "packages": {lang: (folders[package_for(lang)] / ".complete").read_text().strip()
                         for lang in langs},
            "options": {"max_words": args.max_words, "min_words": args.min_words},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n",
                                               encoding="utf-8")

    table = [["file", "examples", *labels]]
    counts = manifest["label_counts"]
    for name, size, by_label in ([files["train"], manifest["sizes"]["train"], counts["train"]],
                                 [files["dev"], manifest["sizes"]["dev"], counts["dev"]],
                                 *([files["test"][lang], manifest["sizes"]["test"][lang],
                                    counts["test"][lang]] for lang in langs)):
        table.append([name, str(size), *(str(by_label.get(label, 0)) for label in labels)])
    log(format_table(table))
    log(f"wrote {args.out} ({time.time() - started:.1f}s)")
    return 0


if __name__ == "__main__":
    run_cli(main)
