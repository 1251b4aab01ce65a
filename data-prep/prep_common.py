"""Helpers shared by the data-prep scripts (imported from the script folder, not installed).

Everything a script needs to fail early and cleanly lives here: one error type whose message the
command line prints without a traceback, strict UTF-8 line reading that names the bad line, the
RAW corpus layout of docs/CONTRACTS.md, and publishing an output folder with one rename so that an
interrupted run never leaves something that looks complete.

This module deliberately imports neither fairseq nor torch, so that input validation (and the
error messages) are fast.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

SPLITS = ("train", "valid", "test")
# Exit codes: 2 = the input or the command line is wrong (the user can fix it), 1 = something
# outside us failed (apt, disk, a library).
EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1


class DataPrepError(Exception):
    """An error the user can act on; printed as one message, never with a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.exit_code = exit_code


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """Run a script's main(), turning DataPrepError and Ctrl-C into a message and an exit code."""
    prog = Path(sys.argv[0]).name
    try:
        code = main(argv)
    except DataPrepError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        code = err.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was published", file=sys.stderr)
        code = 130
    except Exception:  # a bug or an environment failure: keep the traceback, it is needed then
        traceback.print_exc()
        code = EXIT_FAILURE
    sys.exit(code)


def log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------------------------
# Language codes
# ----------------------------------------------------------------------------------------------
_LANG_RE = re.compile(r"^[a-z]{2,3}(-[a-z0-9]{2,8})*$")
# Scripts written without spaces between words: lengths are counted in characters there.
_CJK_PREFIXES = ("zh", "ja", "th", "my", "km", "lo")  # not ko: Korean spaces its words


def check_lang_code(lang: str, source: Path | None = None) -> str:
    """`lang` if it is a valid code; `source` is the file whose name holds it (for the message)."""
    if not _LANG_RE.match(lang):
        where = f"file {source}: its name holds " if source is not None else ""
        fix = "; rename the file" if source is not None else ""
        raise DataPrepError(
            f"{where}bad language code '{lang}': codes are lower case letters, digits and '-' "
            f"like 'en', 'de', 'zh-cn'{fix}")
    return lang


def is_unspaced_script(lang: str) -> bool:
    """True for languages whose text has no spaces between words (count characters there)."""
    return lang.split("-")[0] in _CJK_PREFIXES


def parse_lang_list(values: Sequence[str] | None) -> list[str] | None:
    """Accept '--langs en de' and '--langs en,de'; keep the order, drop duplicates."""
    if not values:
        return None
    langs: list[str] = []
    for value in values:
        for lang in re.split(r"[,\s]+", value.strip()):
            if lang and lang not in langs:
                langs.append(check_lang_code(lang))
    return langs or None


# ----------------------------------------------------------------------------------------------
# Reading text strictly
# ----------------------------------------------------------------------------------------------
def iter_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file, without line ends, read as a stream.

    Splits on '\\n' only (str.splitlines would also split on U+2028 and friends, which would
    silently break the line alignment of parallel files). Raises DataPrepError naming the file
    and the 1-based line of the first byte sequence that is not UTF-8.
    """
    if not path.is_file():
        raise DataPrepError(f"missing input file: {path}")
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataPrepError(
                    f"{path}:{line_no}: not UTF-8 (byte 0x{raw[err.start]:02x} at byte "
                    f"{err.start + 1} of the line); convert the file to UTF-8 first") from None
            if line_no == 1 and text.startswith("\ufeff"):  # a byte-order mark is not text
                text = text[1:]
            if text.endswith("\n"):
                text = text[:-1]
            if text.endswith("\r"):
                text = text[:-1]
            yield text


def read_lines(path: Path) -> list[str]:
    return list(iter_lines(path))


# ----------------------------------------------------------------------------------------------
# RAW layout (docs/CONTRACTS.md)
#   RAW/mono/{lang}.{split}.txt
#   RAW/para/{src}-{tgt}.{split}.{src}  and  RAW/para/{src}-{tgt}.{split}.{tgt}
# ----------------------------------------------------------------------------------------------
@dataclass
class RawCorpus:
    root: Path
    mono: dict[tuple[str, str], Path] = field(default_factory=dict)  # (lang, split) -> file
    # (src, tgt, split) -> (src file, tgt file)
    para: dict[tuple[str, str, str], tuple[Path, Path]] = field(default_factory=dict)

    @property
    def languages(self) -> set[str]:
        langs = {lang for lang, _ in self.mono}
        for src, tgt, _ in self.para:
            langs.update((src, tgt))
        return langs

    @property
    def pairs(self) -> set[tuple[str, str]]:
        return {(src, tgt) for src, tgt, _ in self.para}

    def restrict(self, langs: Sequence[str]) -> "RawCorpus":
        """Keep the given languages (and the pairs whose two sides are both kept)."""
        keep = set(langs)
        return RawCorpus(
            self.root,
            {key: p for key, p in self.mono.items() if key[0] in keep},
            {key: p for key, p in self.para.items() if key[0] in keep and key[1] in keep})

    def train_files(self, lang: str) -> list[Path]:
        """Every train-split file holding text in `lang` (mono, and its side of each pair)."""
        files = [p for (l, split), p in sorted(self.mono.items()) if l == lang and split == "train"]
        for (src, tgt, split), (src_file, tgt_file) in sorted(self.para.items()):
            if split == "train" and lang in (src, tgt):
                files.append(src_file if lang == src else tgt_file)
        return files


def scan_raw(root: Path) -> RawCorpus:
    """Find the files of the RAW layout under `root`; complain about anything half-there."""
    if not root.is_dir():
        raise DataPrepError(f"missing RAW corpus folder: {root}")
    mono_dir, para_dir = root / "mono", root / "para"
    if not mono_dir.is_dir() and not para_dir.is_dir():
        raise DataPrepError(
            f"{root} holds neither mono/ nor para/: expected RAW/mono/{{lang}}.{{split}}.txt "
            f"and/or RAW/para/{{src}}-{{tgt}}.{{split}}.{{lang}} (see docs/CONTRACTS.md)")
    corpus = RawCorpus(root)
    ignored: list[str] = []
    split_alt = "|".join(SPLITS)
    if mono_dir.is_dir():
        mono_re = re.compile(rf"^(?P<lang>[^.]+)\.(?P<split>{split_alt})\.txt$")
        for path in sorted(mono_dir.iterdir()):
            m = mono_re.match(path.name)
            if not m or not path.is_file():
                ignored.append(str(path))
                continue
            corpus.mono[(check_lang_code(m["lang"], path), m["split"])] = path
    if para_dir.is_dir():
        para_re = re.compile(rf"^(?P<pair>[^.]+)\.(?P<split>{split_alt})\.(?P<lang>[^.]+)$")
        sides: dict[tuple[str, str], dict[str, Path]] = {}
        for path in sorted(para_dir.iterdir()):
            m = para_re.match(path.name)
            if not m or not path.is_file():
                ignored.append(str(path))
                continue
            sides.setdefault((m["pair"], m["split"]), {})[m["lang"]] = path
        for (pair, split), files in sorted(sides.items()):
            # Language codes may hold '-' themselves (zh-cn), so find the split of the pair name
            # that matches the language suffixes actually present.
            src_tgt = [(a, b) for a in files for b in files if a != b and f"{a}-{b}" == pair]
            if not src_tgt:
                present = ", ".join(str(p) for p in files.values())
                candidates = [pair[:i] for i in range(1, len(pair)) if pair[i] == "-"] + \
                             [pair[i + 1:] for i in range(1, len(pair)) if pair[i] == "-"]
                wanted = [para_dir / f"{pair}.{split}.{lang}" for lang in candidates
                          if lang not in files]
                hint = f"; expected its partner, e.g. {wanted[0]}" if len(files) == 1 and wanted \
                    else ""
                raise DataPrepError(
                    f"parallel data {pair} ({split}) is incomplete: found only {present}{hint}")
            src, tgt = src_tgt[0]
            check_lang_code(src, files[src]), check_lang_code(tgt, files[tgt])
            corpus.para[(src, tgt, split)] = (files[src], files[tgt])
            extra = set(files) - {src, tgt}
            ignored.extend(str(files[lang]) for lang in sorted(extra))
    for name in ignored:
        print(f"warning: ignoring {name} (not part of the RAW layout)", file=sys.stderr)
    if not corpus.mono and not corpus.para:
        raise DataPrepError(f"no corpus files found under {root}/mono or {root}/para")
    return corpus


def select_languages(corpus: RawCorpus, wanted: Sequence[str] | None) -> list[str]:
    """The languages to use, in manifest order: `wanted` as given, else English first then the
    rest sorted. Raises when a wanted language has no file, listing what is available."""
    available = corpus.languages
    if wanted:
        missing = [lang for lang in wanted if lang not in available]
        if missing:
            raise DataPrepError(
                f"language(s) {', '.join(missing)} not found in {corpus.root}; "
                f"available: {', '.join(sorted(available))}")
        return list(wanted)
    return sorted(available, key=lambda lang: (lang != "en", lang))


def check_train_text(corpus: RawCorpus, langs: Sequence[str]) -> None:
    """Every language needs train text (its mono file or a train pair): one with only valid or
    test files could be neither tokenized for nor trained on. train_spm.py and binarize.py both
    refuse it, naming what was found."""
    for lang in langs:
        if corpus.train_files(lang):
            continue
        found = sorted(str(p) for (l, _), p in corpus.mono.items() if l == lang)
        found += sorted(str(files[(src, tgt).index(lang)]) for (src, tgt, _), files in
                        corpus.para.items() if lang in (src, tgt))
        raise DataPrepError(
            f"language {lang} has no train text in {corpus.root} (found only "
            f"{', '.join(found)}): add {corpus.root / 'mono' / f'{lang}.train.txt'} or a train "
            f"pair, or leave {lang} out with --langs")


def is_blank(line: str) -> bool:
    return not line.strip()


def iter_mono(path: Path) -> Iterator[str]:
    """Non-blank lines of a monolingual file (CC-100 style corpora separate documents with blank
    lines; an empty item would teach nothing)."""
    return (line for line in iter_lines(path) if not is_blank(line))


def check_mono(path: Path) -> tuple[int, int]:
    """Read a monolingual file once to validate it: (non-blank lines, blank lines skipped)."""
    kept = blank = 0
    for line in iter_lines(path):
        if is_blank(line):
            blank += 1
        else:
            kept += 1
    if not kept:
        raise DataPrepError(f"empty language file: {path} has no non-blank line")
    return kept, blank


def iter_para(src_file: Path, tgt_file: Path) -> Iterator[tuple[str, str]]:
    """Aligned pairs; a pair with a blank side is dropped whole, so alignment holds. Call
    check_para first: this does not notice files of different length."""
    for src, tgt in zip(iter_lines(src_file), iter_lines(tgt_file)):
        if not is_blank(src) and not is_blank(tgt):
            yield src, tgt


def check_para(src_file: Path, tgt_file: Path) -> tuple[int, int]:
    """Read a pair of parallel files once to validate them: (pairs kept, pairs dropped)."""
    n_src = n_tgt = kept = 0
    src_lines, tgt_lines = iter_lines(src_file), iter_lines(tgt_file)
    for src in src_lines:
        n_src += 1
        tgt = next(tgt_lines, None)
        if tgt is None:
            continue  # keep counting the longer file for the message below
        n_tgt += 1
        kept += not is_blank(src) and not is_blank(tgt)
    n_tgt += sum(1 for _ in tgt_lines)
    if n_src != n_tgt:
        raise DataPrepError(
            f"parallel files differ in line count: {src_file} has {n_src} lines, "
            f"{tgt_file} has {n_tgt} lines")
    if not kept:
        raise DataPrepError(
            f"empty language file: {src_file} / {tgt_file} hold no pair with two non-blank sides")
    return kept, n_src - kept


# ----------------------------------------------------------------------------------------------
# Publishing an output folder
# ----------------------------------------------------------------------------------------------
def folder_holds_data(path: Path) -> bool:
    return path.is_dir() and any(not p.name.startswith(".") for p in path.iterdir())


def check_output_folder(path: Path, force: bool, what: str) -> None:
    """Refuse (before any work) to replace an output folder that already holds data."""
    if path.exists() and not path.is_dir():
        raise DataPrepError(f"output {path} exists and is not a folder")
    if folder_holds_data(path) and not force:
        raise DataPrepError(
            f"output folder {path} already holds {what}; pass --force to replace it "
            f"(it is only replaced once the new one is complete)")


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def clean_stale_staging(final: Path) -> None:
    """Remove what an earlier run killed outright (SIGKILL, power loss) left beside `final`:
    its `.{name}.tmp-PID` staging folder, or restore `final` from its `.{name}.old-PID` copy when
    the run died between the two renames. Folders of a process still running are left alone."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(tmp|old)-(\d+)")
    for path in sorted(final.parent.glob(f".{final.name}.*-*")):
        match = pattern.fullmatch(path.name)
        if not match or not path.is_dir() or _process_is_running(int(match[2])):
            continue
        if match[1] == "old" and not final.exists():
            path.rename(final)
            log(f"note: restored {final} from {path}, left by an interrupted run "
                f"(process {match[2]} is gone)")
        else:
            shutil.rmtree(path)
            log(f"note: removed {path}, left by an interrupted run (process {match[2]} is gone)")


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `final`; on success swap it into place with renames.

    The old contents of `final` survive until the new folder is complete, and a crash or Ctrl-C
    leaves only a `.{name}.tmp-*` folder (removed here when possible, else by the next run: see
    clean_stale_staging), never a half-written `final`.
    """
    final = final.absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(final)
    staging = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    retired = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(retired)
    staging.rename(final)
    if retired.exists():
        shutil.rmtree(retired)


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))) for row in rows)


# ----------------------------------------------------------------------------------------------
# sentencepiece model + fairseq dictionary
# ----------------------------------------------------------------------------------------------
# fairseq's Dictionary adds these itself (<s> <pad> </s> <unk>, then dict.txt from index 4), and
# tasks append <mask>; a dict.txt may still list them with the #fairseq:overwrite flag.
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
OVERWRITE_FLAG = "#fairseq:overwrite"


def load_spm(path: Path):
    """A sentencepiece processor for `path`, or a DataPrepError naming the file."""
    import sentencepiece as spm  # fast to import; kept local so --help never needs it

    if not path.is_file():
        raise DataPrepError(f"missing sentencepiece model: {path}")
    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError) as err:
        raise DataPrepError(f"{path} is not a sentencepiece model ({err})") from None
    return processor


def read_dict_entries(path: Path) -> list[tuple[int, str, int]]:
    """(line number, piece, count) of a fairseq dict.txt, parsed the way fairseq parses it."""
    if not path.is_file():
        raise DataPrepError(f"missing dictionary: {path}")
    entries = []
    seen: dict[str, int] = {}
    for line_no, line in enumerate(read_lines(path), start=1):
        fields = line.rstrip().rsplit(" ", 1)
        overwrite = len(fields) == 2 and fields[1] == OVERWRITE_FLAG
        if overwrite:
            fields = fields[0].rsplit(" ", 1)
        if len(fields) != 2 or not fields[0] or not fields[1].lstrip("-").isdigit():
            raise DataPrepError(
                f"{path}:{line_no}: expected '<piece> <count>' as fairseq writes it, got {line!r}")
        piece, count = fields[0], int(fields[1])
        if piece in seen and not overwrite:
            raise DataPrepError(
                f"{path}:{line_no}: piece {piece!r} is listed twice (first on line {seen[piece]})")
        seen.setdefault(piece, line_no)
        entries.append((line_no, piece, count))
    if not entries:
        raise DataPrepError(f"empty dictionary: {path}")
    return entries


def check_dict_matches_spm(spm_path: Path, dict_path: Path):
    """Every dict.txt entry must be a piece of the sentencepiece model (fairseq specials aside);
    otherwise the dictionary belongs to another model. Returns (processor, entries)."""
    processor = load_spm(spm_path)
    entries = read_dict_entries(dict_path)
    unk_id = processor.unk_id()
    for line_no, piece, _ in entries:
        if piece in FAIRSEQ_SPECIALS:
            continue
        piece_id = processor.piece_to_id(piece)
        if piece_id == unk_id and piece != processor.id_to_piece(unk_id):
            raise DataPrepError(
                f"{dict_path}:{line_no}: dictionary piece {piece!r} is not in the sentencepiece "
                f"model {spm_path}: this dict.txt was made for another model")
    return processor, entries
