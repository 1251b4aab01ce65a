"""Helpers for the data-prep tests: a small generated RAW corpus in three languages (one of them
Chinese, which has no spaces), a runner for the scripts as a user runs them, folder hashes."""
from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA_PREP = REPO / "data-prep"

EN_WORDS = ("the a this each document table cell chart page style format select click open save "
            "insert text field value column row sheet data list menu dialog option button "
            "window file name number image frame object macro print view edit tools").split()
DE_WORDS = ("der die das jede Dokument Tabelle Zelle Diagramm Seite Vorlage Format wählen "
            "klicken öffnen speichern einfügen Text Feld Wert Spalte Zeile Blatt Daten Liste "
            "Menü Dialog Option Schaltfläche Fenster Datei Name Zahl Bild Rahmen Objekt Makro "
            "drucken Ansicht bearbeiten Größe").split()
ZH_CHARS = ("的一是在不了有和人这中大为上个我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产"
            "种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当")

MONO_SIZES = {"train": 300, "valid": 30, "test": 30}
PARA_SIZES = {"train": 150, "valid": 20, "test": 20}
LANGS = ("en", "de", "zh-cn")
BLANK_LINES_IN_EN_TRAIN = 2  # CC-100 style document breaks; binarize skips them


def make_sentence(lang: str, rng: random.Random) -> str:
    if lang == "zh-cn":
        return "".join(rng.choice(ZH_CHARS) for _ in range(rng.randint(6, 18))) + "。"
    words = EN_WORDS if lang == "en" else DE_WORDS
    sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
    return sentence[0].upper() + sentence[1:] + "."


def write_raw_corpus(root: Path, seed: int = 0) -> Path:
    """RAW/mono/{en,de,zh-cn}.{split}.txt and RAW/para/en-{de,zh-cn}.{split}.{lang}."""
    rng = random.Random(seed)
    (root / "mono").mkdir(parents=True)
    (root / "para").mkdir()
    for lang in LANGS:
        for split, n in MONO_SIZES.items():
            lines = [make_sentence(lang, rng) for _ in range(n)]
            if lang == "en" and split == "train":
                lines[10:10] = [""] * BLANK_LINES_IN_EN_TRAIN
            (root / "mono" / f"{lang}.{split}.txt").write_text(
                "".join(line + "\n" for line in lines), encoding="utf-8")
    for tgt in ("de", "zh-cn"):
        for split, n in PARA_SIZES.items():
            pairs = [(make_sentence("en", rng), make_sentence(tgt, rng)) for _ in range(n)]
            for side, lang in ((0, "en"), (1, tgt)):
                (root / "para" / f"en-{tgt}.{split}.{lang}").write_text(
                    "".join(p[side] + "\n" for p in pairs), encoding="utf-8")
    return root


def run_script(script: str, *args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run data-prep/<script> the way a user does, capturing its output."""
    command = [str(DATA_PREP / script), *map(str, args)]
    if script.endswith(".py"):
        command.insert(0, sys.executable)
    else:
        command.insert(0, "bash")
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def folder_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root (hidden ones too), keyed by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


HELP_FOLDERS = {"en": ("libreoffice-help-en-us", "en-US"), "de": ("libreoffice-help-de", "de"),
                "zh-cn": ("libreoffice-help-zh-cn", "zh-CN")}


def help_page(lang_folder: str, body: str) -> str:
    """A help page shaped like the packaged ones: navigation, #DisplayArea, debug footer."""
    return f"""<!DOCTYPE html>
<html lang="{lang_folder}"><head><title>T</title></head><body>
<header id="TopLeftHeader"><a class="logo" href="x"><p dir="auto">LibreOffice 7.4 Help</p></a>
</header>
<div id="DisplayArea" itemprop="softwareHelp">
{body}
</div>
<div id="SearchFrame"></div>
<footer><div id="DEBUG" class="debug"><p id="bm_module" dir="auto">Title is: T</p></div></footer>
</body></html>
"""


def write_help_cache(cache: Path, pages: dict[str, dict[str, str]]) -> Path:
    """Unpacked help packages as fetch_libreoffice.py leaves them in its cache, so that no apt
    call is needed: pages[lang][path under the language folder, e.g. text/shared/x.html] is the
    HTML body of that page (languages of HELP_FOLDERS). A media/ page is added, never parsed."""
    for lang, bodies in pages.items():
        package, folder = HELP_FOLDERS[lang]
        root = cache / "unpacked" / package
        help_root = root / "usr/share/libreoffice/help" / folder
        for path, body in bodies.items():
            (help_root / path).parent.mkdir(parents=True, exist_ok=True)
            (help_root / path).write_text(help_page(folder, body), encoding="utf-8")
        media = root / "usr/share/libreoffice/help/media"
        media.mkdir(parents=True, exist_ok=True)
        (media / "junk.html").write_text(help_page(folder, '<p id="x">Not help text at all.</p>'))
        (root / ".complete").write_text(f"{package}_1.0_all.deb\n")
    return cache


# A help corpus for the topic task: words that name a module, and words every page uses; the
# German and Chinese "translations" are the words at the same index of DE_WORDS / ZH_CHARS.
TOPIC_MODULE_WORDS = {"scalc": ["sheet", "cell", "column", "row"], "swriter": ["text", "page", "style", "frame"],
                      "shared": ["file", "window", "dialog", "menu"], "sbasic": ["macro", "object", "field", "value"]}
TOPIC_FILLER = ["the", "select", "click", "open", "save", "insert"]
UNTRANSLATED = "This paragraph was never translated into German."


def translate_words(words: list[str], lang: str) -> str:
    if lang == "en":
        return " ".join(words)
    if lang == "de":
        return " ".join(DE_WORDS[EN_WORDS.index(w)] if w in EN_WORDS else w for w in words)
    return "".join(ZH_CHARS[EN_WORDS.index(w)] if w in EN_WORDS else w for w in words)


def topic_page_body(module: str, number: int, lang: str) -> str:
    """A title and three paragraphs naming the module; on every third page the first paragraph
    is left in English in the German help (untranslated)."""
    keywords = TOPIC_MODULE_WORDS[module]
    title = translate_words([keywords[number % 4], str(number)], lang)
    first = translate_words([TOPIC_FILLER[number % 6], *keywords, TOPIC_FILLER[(number + 1) % 6], str(number)], lang)
    second = translate_words([*reversed(keywords), "the", keywords[0]], lang)
    untranslated = UNTRANSLATED if number % 3 == 0 else translate_words(["open", "file", str(number)], lang)
    return (f'<h1 id="hd_1">{title}</h1>\n<p id="par_1">{untranslated if lang != "zh-cn" else first}</p>\n'
            f'<p id="par_2">{first}</p>\n<p id="par_3">{second}</p>')


def topic_help_pages(pages_per_module: int) -> dict[str, dict[str, str]]:
    """{lang: {page path: body}} for en, de and zh-cn: pages_per_module pages of each module of
    TOPIC_MODULE_WORDS (for write_help_cache)."""
    return {lang: {f"text/{module}/01/page{number}.html": topic_page_body(module, number, lang)
                   for module in TOPIC_MODULE_WORDS for number in range(pages_per_module)}
            for lang in ("en", "de", "zh-cn")}
