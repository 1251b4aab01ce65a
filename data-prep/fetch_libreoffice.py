#!/usr/bin/env python3
"""Build a small real multilingual corpus from Debian's LibreOffice help packages.

The `libreoffice-help-<lang>` packages (MPL-2.0) carry the same help pages in many languages, and
every paragraph keeps the same HTML `id` in every language, so paragraphs align across languages by
(page, id). This script downloads the packages with `apt-get download` (never installs them),
unpacks them with `dpkg-deb -x` into a cache folder, extracts the paragraphs and writes the RAW
layout of docs/CONTRACTS.md:

    RAW/mono/{lang}.{train,valid,test}.txt       unique paragraphs (>= --min-mono-chars)
    RAW/para/en-{x}.{split}.en / .{x}            English paragraph and its translation
    RAW/fetch_info.json                          languages, packages, options and counts

Held-out splits are chosen by a stable hash of the paragraph key (page path + id), so a paragraph
falls into the same split in every language and pair, and text that appears under a held-out key
is kept out of every train file.

Language codes are ours (lower case): `en` is the package `libreoffice-help-en-us` (help folder
en-US); other codes are the package suffix, e.g. `zh-cn` -> `libreoffice-help-zh-cn` (zh-CN).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prep_common import (  # noqa: E402
    EXIT_FAILURE, DataPrepError, check_output_folder, format_table, is_unspaced_script, log,
    parse_lang_list, run_cli, staged_folder)

DEFAULT_LANGS = ["en", "de", "fr", "es", "ru", "zh-cn"]
PACKAGE_PREFIX = "libreoffice-help-"
HELP_ROOT = Path("usr/share/libreoffice/help")
# Bump when the extraction rules change, so cached paragraph files are rebuilt.
PARSER_VERSION = 2

# ----------------------------------------------------------------------------------------------
# Language code <-> Debian package
# ----------------------------------------------------------------------------------------------


def package_for(lang: str) -> str:
    """Debian package holding the help of `lang` (our code; English is packaged as en-us)."""
    return PACKAGE_PREFIX + ("en-us" if lang == "en" else lang)


def lang_for_package(package: str) -> str:
    suffix = package[len(PACKAGE_PREFIX):]
    return "en" if suffix == "en-us" else suffix


# ----------------------------------------------------------------------------------------------
# HTML -> paragraphs
# ----------------------------------------------------------------------------------------------
PARAGRAPH_TAGS = {"p", "h1", "h2", "h3", "h4", "h5", "h6"}
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
             "track", "wbr"}
SKIP_TAGS = {"script", "style", "noscript", "img", "button"}


class _Node:
    __slots__ = ("tag", "attrs", "children")

    def __init__(self, tag: str, attrs: dict[str, str]):
        self.tag = tag
        self.attrs = attrs
        self.children: list[_Node | str] = []


class _TreeBuilder(HTMLParser):
    """A forgiving mini-DOM: the help pages are generated XHTML-like markup, so explicit end tags
    are enough; an end tag without an open element is ignored."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = _Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = _Node(tag, {k: (v or "") for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID_TAGS:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(_Node(tag, {k: (v or "") for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def _is_paragraph(node: _Node) -> bool:
    return node.tag in PARAGRAPH_TAGS and bool(node.attrs.get("id"))


def _switch_case(node: _Node) -> _Node | None:
    """The one case of an inline switch to keep.

    `<span class="switchinline">` holds hidden alternatives (MAC / default, or WRITER / CALC ...)
    that the help viewer's script picks from; keeping all would glue "Command Ctrl" together. Keep
    the `default...` case, else the first, the same way in every language.
    """
    cases = [c for c in node.children if isinstance(c, _Node)]
    for case in cases:
        if case.attrs.get("id", "").startswith("default"):
            return case
    return cases[0] if cases else None


def _collect_text(node: _Node, out: list[str]) -> None:
    for child in node.children:
        if isinstance(child, str):
            out.append(child)
        elif child.tag == "br":
            out.append(" ")
        elif child.tag in SKIP_TAGS or _is_paragraph(child):
            continue  # a nested paragraph is collected on its own
        elif "switchinline" in child.attrs.get("class", "").split():
            case = _switch_case(child)
            if case is not None:
                _collect_text(case, out)
        else:
            _collect_text(child, out)


# NOTE: about half of a page's tags lie outside the paragraphs (tables, icons, code highlighting),
# and html.parser spends its time per tag. Cutting out just the paragraph elements with this
# pattern before parsing halves the parse time; it gives identical results on the whole 7.4 help
# in de and zh-CN, because the generated pages never nest one paragraph element in another.
_PARAGRAPH_RE = re.compile(r'<(p|h[1-6])\s(?:[^>]*\s)?id="[^"]*"[^>]*>.*?</\1\s*>', re.S)


def extract_paragraphs(html: str) -> dict[str, str]:
    """Map HTML id -> whitespace-normalised text for every p/h1..h6 with an id in a help page.

    Only the page body (`#DisplayArea`) is read, so the navigation header and the debug footer
    are left out. When an id repeats within a page, the first occurrence wins. Empty paragraphs
    (image holders) are left out.
    """
    start = html.find('<div id="DisplayArea"')
    end = html.find('<div id="SearchFrame"', start if start >= 0 else 0)
    page_body = html[start if start >= 0 else 0: end if end >= 0 else len(html)]
    body = "\n".join(m.group(0) for m in _PARAGRAPH_RE.finditer(page_body))
    builder = _TreeBuilder()
    builder.feed(body)
    builder.close()
    paragraphs: dict[str, str] = {}
    pending = [builder.root]
    while pending:  # pre-order walk so that earlier occurrences win
        node = pending.pop()
        if _is_paragraph(node):
            parts: list[str] = []
            _collect_text(node, parts)
            text = " ".join("".join(parts).split())
            if text and node.attrs["id"] not in paragraphs:
                paragraphs[node.attrs["id"]] = text
        pending.extend(reversed([c for c in node.children if isinstance(c, _Node)]))
    return paragraphs


def help_folder(extracted: Path, package: str) -> Path:
    """The language folder of an unpacked help package (en-US, de, zh-CN, ...), never media/."""
    root = extracted / HELP_ROOT
    folders = [p for p in root.iterdir() if p.is_dir() and p.name != "media"] \
        if root.is_dir() else []
    if len(folders) != 1:
        raise DataPrepError(
            f"unexpected layout of {package} in {extracted}: expected one language folder under "
            f"{HELP_ROOT}, found {[p.name for p in folders]}", EXIT_FAILURE)
    return folders[0]


def parse_help_folder(folder: Path) -> dict[str, str]:
    """Paragraphs of every help page under `folder`, keyed 'page/path.html#id'."""
    paragraphs: dict[str, str] = {}
    for page in sorted(folder.rglob("*.html")):
        relative = page.relative_to(folder)
        if relative.parts[0] == "media":
            continue
        text = page.read_text(encoding="utf-8", errors="replace")
        for par_id, par_text in extract_paragraphs(text).items():
            paragraphs[f"{relative.as_posix()}#{par_id}"] = par_text
    return paragraphs


# ----------------------------------------------------------------------------------------------
# Cache: download, unpack, parse (each step reused when already done)
# ----------------------------------------------------------------------------------------------
def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    log("+ " + " ".join(cmd))
    return subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _apt_knows(package: str) -> bool:
    result = subprocess.run(["apt-cache", "show", "--no-all-versions", package],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return result.returncode == 0


def _available_languages() -> list[str]:
    result = subprocess.run(["apt-cache", "pkgnames", PACKAGE_PREFIX], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    names = sorted(set(result.stdout.split()))
    return sorted(lang_for_package(n) for n in names if n != PACKAGE_PREFIX + "common")


def _cached_deb(debs: Path, package: str) -> Path | None:
    found = sorted(debs.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def download_packages(packages: list[str], debs: Path) -> None:
    """`apt-get download` the packages not yet in `debs` (apt-get update only when needed)."""
    if shutil.which("apt-get") is None:
        raise DataPrepError("apt-get not found: this step needs a Debian/Ubuntu system; "
                            "or bring your own RAW corpus (docs/CONTRACTS.md)", EXIT_FAILURE)
    unknown = [p for p in packages if not _apt_knows(p)]
    if unknown:
        # Package lists missing or stale: refresh them once.
        result = _run(["apt-get", "update"])
        if result.returncode != 0:
            raise DataPrepError(f"apt-get update failed:\n{result.stdout}", EXIT_FAILURE)
        unknown = [p for p in packages if not _apt_knows(p)]
    if unknown:
        langs = [lang_for_package(p) for p in unknown]
        raise DataPrepError(
            f"no LibreOffice help package for language(s) {', '.join(langs)} "
            f"({', '.join(unknown)}); available: {', '.join(_available_languages())}")
    # Download into a private folder first, so an interrupted download never looks cached.
    staging = debs / f".download-{os.getpid()}"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        result = _run(["apt-get", "download", *packages], cwd=staging)
        if result.returncode != 0:
            raise DataPrepError(f"apt-get download failed:\n{result.stdout}", EXIT_FAILURE)
        for deb in staging.glob("*.deb"):
            deb.rename(debs / deb.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def unpack(deb: Path, extracted: Path) -> None:
    """`dpkg-deb -x` into `extracted`, via a temporary folder and a completion marker."""
    staging = extracted.parent / f".{extracted.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    result = _run(["dpkg-deb", "-x", str(deb), str(staging)])
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataPrepError(f"dpkg-deb -x {deb} failed:\n{result.stdout}", EXIT_FAILURE)
    (staging / ".complete").write_text(deb.name + "\n")
    shutil.rmtree(extracted, ignore_errors=True)
    staging.rename(extracted)


def ensure_unpacked(packages: list[str], cache: Path, offline: bool) -> dict[str, Path]:
    """Unpacked folder of every package, downloading and unpacking only what is missing."""
    debs, unpacked_root = cache / "debs", cache / "unpacked"
    debs.mkdir(parents=True, exist_ok=True)
    unpacked_root.mkdir(parents=True, exist_ok=True)

    def is_unpacked(package: str) -> bool:
        return (unpacked_root / package / ".complete").is_file()

    to_download = [p for p in packages if not is_unpacked(p) and _cached_deb(debs, p) is None]
    if to_download:
        if offline:
            raise DataPrepError(
                f"--offline: not in the cache {cache}: {', '.join(to_download)}")
        download_packages(to_download, debs)
    folders = {}
    for package in packages:
        folder = unpacked_root / package
        if not is_unpacked(package):
            deb = _cached_deb(debs, package)
            if deb is None:
                raise DataPrepError(f"apt-get download did not produce {package}", EXIT_FAILURE)
            unpack(deb, folder)
        folders[package] = folder
    return folders


def _parse_cached(job: tuple[str, str, str]) -> tuple[str, dict[str, str], float]:
    """Paragraphs of one unpacked package, cached as gzipped JSON beside it (worker function)."""
    package, folder_str, cache_file_str = job
    folder, cache_file = Path(folder_str), Path(cache_file_str)
    stamp = (folder / ".complete").read_text().strip()
    started = time.time()
    if cache_file.is_file():
        with gzip.open(cache_file, "rt", encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("parser_version") == PARSER_VERSION and cached.get("deb") == stamp:
            return package, cached["paragraphs"], time.time() - started
    paragraphs = parse_help_folder(help_folder(folder, package))
    tmp = cache_file.with_name(cache_file.name + f".tmp-{os.getpid()}")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump({"parser_version": PARSER_VERSION, "deb": stamp, "paragraphs": paragraphs}, f,
                  ensure_ascii=False)
    tmp.rename(cache_file)
    return package, paragraphs, time.time() - started


def load_paragraphs(folders: dict[str, Path], cache: Path, workers: int,
                    ) -> dict[str, dict[str, str]]:
    """package -> {key: text}, parsing the packages in parallel (about 7 s each on one core)."""
    parsed_dir = cache / "parsed"
    parsed_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(p, str(f), str(parsed_dir / f"{p}.json.gz")) for p, f in folders.items()]
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            results = pool.map(_parse_cached, jobs)
    else:
        results = [_parse_cached(job) for job in jobs]
    return {package: paragraphs for package, paragraphs, _ in results}


# ----------------------------------------------------------------------------------------------
# Paragraphs -> RAW corpus
# ----------------------------------------------------------------------------------------------
def split_of(key: str, valid_percent: float, test_percent: float) -> str:
    """Held-out split of a paragraph key, the same in every language: a stable hash (not
    Python's salted hash()) mapped to [0, 100)."""
    bucket = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") % 1_000_000
    percent = bucket / 10_000
    if percent < valid_percent:
        return "valid"
    if percent < valid_percent + test_percent:
        return "test"
    return "train"


# Measured on the zh-cn help: median 1.8 characters per English word of the aligned paragraph.
CJK_CHARS_PER_WORD = 2.0


def word_equivalents(text: str, lang: str) -> float:
    """Length in words; for scripts written without spaces, characters / CJK_CHARS_PER_WORD."""
    if is_unspaced_script(lang):
        return sum(1 for ch in text if not ch.isspace()) / CJK_CHARS_PER_WORD
    return len(text.split())


def _split_texts(keyed: dict[str, str], splits: dict[str, str]) -> dict[str, set[str]]:
    by_split: dict[str, set[str]] = {"train": set(), "valid": set(), "test": set()}
    for key, text in keyed.items():
        by_split[splits[key]].add(text)
    return by_split


def build_corpus(paragraphs: dict[str, dict[str, str]], langs: list[str], *,
                 valid_percent: float, test_percent: float, min_mono_chars: int,
                 min_mono_chars_cjk: int, min_words: int, max_words: int, max_ratio: float,
                 ) -> tuple[dict[str, dict[str, list[str]]],
                            dict[str, dict[str, tuple[list[str], list[str]]]],
                            dict[str, int]]:
    """Monolingual and English-X parallel text per split from {lang: {key: text}}.

    - A non-English paragraph identical to the English one with the same key is untranslated
      and dropped everywhere.
    - Mono: unique paragraphs of >= min_mono_chars characters (min_mono_chars_cjk for scripts
      without spaces, whose characters carry more). A text found under a test key is
      test only; under a valid key (and no test key) valid only; otherwise train.
    - Para: English side of min_words..max_words words, and a length ratio of the other side
      (words, or CJK characters / CJK_CHARS_PER_WORD) to it within 1/max_ratio..max_ratio. Train
      pairs whose either side also occurs under a held-out key are dropped, so test sentences
      are never trained on.
    Returns (mono[lang][split] -> lines, para[lang][split] -> (en lines, x lines), dropped
    untranslated counts per language).
    """
    english = paragraphs["en"]
    splits = {key: split_of(key, valid_percent, test_percent)
              for lang in langs for key in paragraphs[lang]}
    translated: dict[str, dict[str, str]] = {"en": english}
    untranslated: dict[str, int] = {}
    for lang in langs:
        if lang == "en":
            continue
        kept = {k: t for k, t in paragraphs[lang].items() if english.get(k) != t}
        untranslated[lang] = len(paragraphs[lang]) - len(kept)
        translated[lang] = kept

    mono: dict[str, dict[str, list[str]]] = {}
    texts_by_split: dict[str, dict[str, set[str]]] = {}
    for lang in langs:
        by_split = _split_texts(translated[lang], splits)
        texts_by_split[lang] = by_split
        test = by_split["test"]
        valid = by_split["valid"] - test
        train = by_split["train"] - test - by_split["valid"]
        min_chars = min_mono_chars_cjk if is_unspaced_script(lang) else min_mono_chars
        mono[lang] = {split: sorted(t for t in texts if len(t) >= min_chars)
                      for split, texts in (("train", train), ("valid", valid), ("test", test))}

    para: dict[str, dict[str, tuple[list[str], list[str]]]] = {}
    for lang in langs:
        if lang == "en":
            continue
        pairs: dict[str, set[tuple[str, str]]] = {"train": set(), "valid": set(), "test": set()}
        for key, x_text in translated[lang].items():
            en_text = english.get(key)
            if en_text is None:
                continue
            en_words = len(en_text.split())
            if not min_words <= en_words <= max_words:
                continue
            x_words = word_equivalents(x_text, lang)
            if not 1 / max_ratio <= x_words / en_words <= max_ratio:
                continue
            pairs[splits[key]].add((en_text, x_text))
        en_texts, x_texts = texts_by_split["en"], texts_by_split[lang]
        pairs["valid"] = {(e, x) for e, x in pairs["valid"]
                          if e not in en_texts["test"] and x not in x_texts["test"]}
        en_held_out = en_texts["valid"] | en_texts["test"]
        x_held_out = x_texts["valid"] | x_texts["test"]
        pairs["train"] = {(e, x) for e, x in pairs["train"]
                          if e not in en_held_out and x not in x_held_out}
        para[lang] = {}
        for split, pair_set in pairs.items():
            ordered = sorted(pair_set)
            para[lang][split] = ([e for e, _ in ordered], [x for _, x in ordered])
    return mono, para, untranslated


def _write_lines(path: Path, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python data-prep/fetch_libreoffice.py --cache-dir cache/libreoffice "
               "--out cache/raw --langs en de fr es ru zh-cn")
    parser.add_argument("--langs", nargs="+", default=None, metavar="LANG",
                        help=f"language codes (default: {' '.join(DEFAULT_LANGS)}); English is "
                             f"always included as the pivot of the parallel data")
    parser.add_argument("--cache-dir", type=Path, default=Path("cache/libreoffice"),
                        help="where .deb files, unpacked packages and parsed paragraphs are kept "
                             "and reused (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True,
                        help="RAW corpus folder to write (created; see docs/CONTRACTS.md)")
    parser.add_argument("--force", action="store_true",
                        help="replace an output folder that already holds data")
    parser.add_argument("--offline", action="store_true",
                        help="never call apt: fail unless every package is already in the cache")
    parser.add_argument("--valid-percent", type=float, default=2.0,
                        help="percent of paragraph ids held out for valid (default: %(default)s)")
    parser.add_argument("--test-percent", type=float, default=2.0,
                        help="percent of paragraph ids held out for test (default: %(default)s)")
    parser.add_argument("--min-mono-chars", type=int, default=20,
                        help="shortest monolingual paragraph kept, in characters "
                             "(default: %(default)s)")
    parser.add_argument("--min-mono-chars-cjk", type=int, default=10,
                        help="the same for scripts written without spaces (zh, ja, th ...) "
                             "(default: %(default)s)")
    parser.add_argument("--min-words", type=int, default=4,
                        help="shortest English side of a pair, in words (default: %(default)s)")
    parser.add_argument("--max-words", type=int, default=60,
                        help="longest English side of a pair, in words (default: %(default)s)")
    parser.add_argument("--max-ratio", type=float, default=3.0,
                        help="largest length ratio between the two sides of a pair, in words "
                             "(CJK: 2 characters count as a word) (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes for parsing HTML, one language each "
                             "(default: number of CPUs, %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    langs = parse_lang_list(args.langs) or list(DEFAULT_LANGS)
    langs = ["en" if lang == "en-us" else lang for lang in langs]
    if "en" not in langs:
        log("note: adding en, the pivot language that paragraphs are aligned to")
    langs = ["en"] + [lang for lang in langs if lang != "en"]
    if not (args.valid_percent >= 0 and args.test_percent >= 0
            and args.valid_percent + args.test_percent < 100):
        raise DataPrepError("--valid-percent and --test-percent must be >= 0 and sum to < 100")
    if not 1 <= args.min_words <= args.max_words:
        raise DataPrepError("need 1 <= --min-words <= --max-words")
    check_output_folder(args.out, args.force, "a RAW corpus")

    packages = [package_for(lang) for lang in langs]
    folders = ensure_unpacked(packages, args.cache_dir, args.offline)
    fetched = time.time()
    by_package = load_paragraphs(folders, args.cache_dir, args.workers)
    paragraphs = {lang_for_package(p): pars for p, pars in by_package.items()}
    parsed = time.time()
    mono, para, untranslated = build_corpus(
        paragraphs, langs, valid_percent=args.valid_percent, test_percent=args.test_percent,
        min_mono_chars=args.min_mono_chars, min_mono_chars_cjk=args.min_mono_chars_cjk,
        min_words=args.min_words, max_words=args.max_words,
        max_ratio=args.max_ratio)
    for lang in langs:
        if not mono[lang]["train"]:
            raise DataPrepError(f"language {lang}: no monolingual train paragraph survived the "
                                f"filters ({package_for(lang)} may be nearly untranslated)")

    with staged_folder(args.out) as staging:
        (staging / "mono").mkdir()
        (staging / "para").mkdir()
        for lang in langs:
            for split, lines in mono[lang].items():
                _write_lines(staging / "mono" / f"{lang}.{split}.txt", lines)
        for lang, by_split in para.items():
            for split, (en_lines, x_lines) in by_split.items():
                _write_lines(staging / "para" / f"en-{lang}.{split}.en", en_lines)
                _write_lines(staging / "para" / f"en-{lang}.{split}.{lang}", x_lines)
        info = {
            "source": "Debian libreoffice-help-* packages (MPL-2.0)",
            "languages": langs,
            "packages": {lang: (folders[package_for(lang)] / ".complete").read_text().strip()
                         for lang in langs},
            "options": {k: getattr(args, k) for k in (
                "valid_percent", "test_percent", "min_mono_chars", "min_mono_chars_cjk",
                "min_words", "max_words", "max_ratio")},
            "paragraphs": {lang: len(paragraphs[lang]) for lang in langs},
            "untranslated_dropped": untranslated,
            "mono": {lang: {s: len(v) for s, v in mono[lang].items()} for lang in langs},
            "para": {f"en-{lang}": {s: len(v[0]) for s, v in by_split.items()}
                     for lang, by_split in para.items()},
        }
        (staging / "fetch_info.json").write_text(json.dumps(info, indent=1) + "\n")

    rows = [["language", "paragraphs", "untranslated", "mono train", "valid", "test"]]
    for lang in langs:
        rows.append([lang, str(len(paragraphs[lang])), str(untranslated.get(lang, "-")),
                     *(str(len(mono[lang][s])) for s in ("train", "valid", "test"))])
    log(format_table(rows))
    rows = [["pair", "train", "valid", "test"]]
    for lang, by_split in para.items():
        rows.append([f"en-{lang}", *(str(len(by_split[s][0])) for s in ("train", "valid", "test"))])
    log(format_table(rows))
    log(f"wrote {args.out} (packages {fetched - started:.1f}s, parsing {parsed - fetched:.1f}s, "
        f"total {time.time() - started:.1f}s)")
    return 0


if __name__ == "__main__":
    run_cli(main)
