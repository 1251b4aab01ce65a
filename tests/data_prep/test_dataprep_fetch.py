"""fetch_libreoffice.py: help HTML -> aligned paragraphs -> RAW, without apt (packages are faked
in the cache folder the script reuses)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from .dataprep_helpers import DATA_PREP, folder_hashes, write_help_cache
from .dataprep_helpers import help_page as _page


@pytest.fixture(scope="module")
def fetch():
    """The script as a module, for its parsing and alignment functions."""
    spec = importlib.util.spec_from_file_location("fetch_libreoffice",
                                                  DATA_PREP / "fetch_libreoffice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EN_BODY = """
<h1 id="hd_id1" dir="auto">Find Bar</h1>
<p id="par_id2" class="paragraph" dir="auto">The <span class="menuitem">Find</span>
   toolbar can   be used to quickly search documents.</p>
<div class="tip"><div class="noteicon"><img src="media/tip.svg" alt="tip"></div>
<div class="notetext"><p id="par_id3" dir="auto">Use the shortcut <span id="swln_1"
 class="switchinline"><span hidden="true" id="MACtext_1" class="MAC"><span class="keycode">Command
 </span></span><span hidden="true" id="defaulttext_1"><span class="keycode">Ctrl</span></span></span>
 <span class="keycode">+ F</span> to open the toolbar.</p></div></div>
<p id="par_id4" class="paragraph" dir="auto">Enter the text to be searched in the document.<br>Press Enter.</p>
<span class="switch"><span hidden="true" id="CALCtext_2" class="CALC">
  <p id="par_id5" class="paragraph" dir="auto">Searches the formatted value of each cell in the sheet.</p>
</span></span>
<p id="par_id6" dir="auto">Moves the cursor to the previous match of the text.</p>
<p id="par_id7" dir="auto"><img src="media/icon.svg" alt="Icon"></p>
<p id="par_id2" dir="auto">A repeated id: the first occurrence wins.</p>
"""

DE_BODY = """
<h1 id="hd_id1" dir="auto">Suchleiste</h1>
<p id="par_id2" class="paragraph" dir="auto">Die Symbolleiste <span class="menuitem">Suchen</span>
   durchsucht Dokumente schnell.</p>
<div class="notetext"><p id="par_id3" dir="auto">Verwenden Sie <span id="swln_1"
 class="switchinline"><span hidden="true" id="MACtext_1" class="MAC">Befehl</span><span
 hidden="true" id="defaulttext_1">Strg</span></span> + F, um die Symbolleiste zu öffnen.</p></div>
<p id="par_id4" class="paragraph" dir="auto">Geben Sie den zu suchenden Text ein.<br>Drücken Sie die Eingabetaste.</p>
<span class="switch"><span hidden="true" id="CALCtext_2" class="CALC">
  <p id="par_id5" class="paragraph" dir="auto">Searches the formatted value of each cell in the sheet.</p>
</span></span>
<p id="par_id6" dir="auto">Bewegt den Cursor zum vorherigen Treffer des Texts.</p>
"""


def test_paragraph_text_keeps_the_default_case_of_inline_switches(fetch):
    paragraphs = fetch.extract_paragraphs(_page("en-US", EN_BODY))
    assert paragraphs == {
        "hd_id1": "Find Bar",
        "par_id2": "The Find toolbar can be used to quickly search documents.",
        "par_id3": "Use the shortcut Ctrl + F to open the toolbar.",  # no "Command"
        "par_id4": "Enter the text to be searched in the document. Press Enter.",
        "par_id5": "Searches the formatted value of each cell in the sheet.",
        "par_id6": "Moves the cursor to the previous match of the text.",
        # par_id7 holds only an image: no text, no paragraph; header and footer are not read
    }


def test_inline_switch_without_default_keeps_its_first_case(fetch):
    html = _page("en-US", '<p id="p1">Open <span class="switchinline"><span id="WRITERx" '
                          'hidden="true">Writer</span><span id="CALCx" hidden="true">Calc'
                          '</span></span> now.</p>')
    assert fetch.extract_paragraphs(html) == {"p1": "Open Writer now."}


def test_corpus_aligns_by_id_and_drops_untranslated_and_short_pairs(fetch):
    en = {f"page.html#{k}": v for k, v in fetch.extract_paragraphs(_page("en-US", EN_BODY)).items()}
    de = {f"page.html#{k}": v for k, v in fetch.extract_paragraphs(_page("de", DE_BODY)).items()}
    mono, para, untranslated = fetch.build_corpus(
        {"en": en, "de": de}, ["en", "de"], valid_percent=0, test_percent=0, min_mono_chars=20,
        min_mono_chars_cjk=10, min_words=4, max_words=60, max_ratio=3.0)
    assert untranslated == {"de": 1}  # par_id5 is English in the German package
    en_lines, de_lines = para["de"]["train"]
    assert sorted(zip(en_lines, de_lines)) == sorted([
        ("The Find toolbar can be used to quickly search documents.",
         "Die Symbolleiste Suchen durchsucht Dokumente schnell."),
        ("Use the shortcut Ctrl + F to open the toolbar.",
         "Verwenden Sie Strg + F, um die Symbolleiste zu öffnen."),
        ("Enter the text to be searched in the document. Press Enter.",
         "Geben Sie den zu suchenden Text ein. Drücken Sie die Eingabetaste."),
        ("Moves the cursor to the previous match of the text.",
         "Bewegt den Cursor zum vorherigen Treffer des Texts."),
    ])  # "Find Bar" has 2 English words (< 4); par_id5 untranslated
    assert "Searches the formatted value of each cell in the sheet." not in mono["de"]["train"]
    assert "Suchleiste" not in mono["de"]["train"]  # shorter than 20 characters
    assert mono["de"]["valid"] == mono["de"]["test"] == []


def test_a_paragraph_id_falls_in_the_same_split_in_every_language_and_test_text_is_not_trained(
        fetch):
    # 400 ids; id i has the same English text as id i+200, so duplicates straddle the splits
    en = {f"p{i}.html#par": f"English paragraph number {i % 200} with enough words."
          for i in range(400)}
    de = {f"p{i}.html#par": f"Deutscher Absatz Nummer {i % 200} mit genug Wörtern."
          for i in range(400)}
    mono, para, _ = fetch.build_corpus(
        {"en": en, "de": de}, ["en", "de"], valid_percent=20, test_percent=20,
        min_mono_chars=20, min_mono_chars_cjk=10, min_words=4, max_words=60, max_ratio=3.0)
    splits = {key: fetch.split_of(key, 20, 20) for key in en}
    assert set(splits.values()) == {"train", "valid", "test"}
    for split in ("valid", "test"):
        en_lines, de_lines = para["de"][split]
        for e, d in zip(en_lines, de_lines):
            assert e.split()[3] == d.split()[3]  # aligned: same number on both sides
    train_text = set(mono["en"]["train"]) | set(para["de"]["train"][0])
    held_out = set(mono["en"]["test"]) | set(para["de"]["test"][0]) | \
        set(mono["en"]["valid"]) | set(para["de"]["valid"][0])
    assert held_out and not train_text & held_out
    assert not set(mono["de"]["train"]) & (set(mono["de"]["test"]) | set(para["de"]["test"][1]))
    # the split of a key does not depend on the language or on the other keys
    assert fetch.split_of("p7.html#par", 20, 20) == splits["p7.html#par"]


def test_chinese_lengths_are_counted_in_characters(fetch):
    assert fetch.word_equivalents("打开查找工具栏", "zh-cn") == 3.5
    assert fetch.word_equivalents("Open the find toolbar", "de") == 4


def _fake_cache(cache: Path) -> None:
    """Unpacked packages as fetch_libreoffice.py leaves them, so no apt call is needed."""
    zh_body = """<h1 id="hd_id1">查找工具栏</h1>
<p id="par_id2">使用「查找」工具栏可以快速搜索 LibreOffice 文档中的内容。</p>
<p id="par_id6">将光标移动到上一个匹配的搜索文本处。</p>"""
    page = "text/shared/find_toolbar.html"
    write_help_cache(cache, {"en": {page: EN_BODY}, "de": {page: DE_BODY}, "zh-cn": {page: zh_body}})


def test_command_line_writes_the_raw_layout_from_cached_packages(tmp_path, run):
    _fake_cache(tmp_path / "cache")
    out = tmp_path / "raw"
    result = run("fetch_libreoffice.py", "--offline", "--cache-dir", tmp_path / "cache", "--out",
                 out, "--langs", "en", "de", "zh-cn", "--valid-percent", "0",
                 "--test-percent", "0", "--workers", "1")
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (out / "para").iterdir())
    assert names == sorted(f"en-{x}.{s}.{l}" for x in ("de", "zh-cn")
                           for s in ("train", "valid", "test") for l in ("en", x))
    assert sorted(p.name for p in (out / "mono").iterdir()) == sorted(
        f"{l}.{s}.txt" for l in ("en", "de", "zh-cn") for s in ("train", "valid", "test"))
    zh_en = (out / "para" / "en-zh-cn.train.en").read_text(encoding="utf-8").splitlines()
    zh = (out / "para" / "en-zh-cn.train.zh-cn").read_text(encoding="utf-8").splitlines()
    assert dict(zip(zh_en, zh)) == {
        "The Find toolbar can be used to quickly search documents.":
            "使用「查找」工具栏可以快速搜索 LibreOffice 文档中的内容。",
        "Moves the cursor to the previous match of the text.": "将光标移动到上一个匹配的搜索文本处。",
    }
    assert (out / "mono" / "zh-cn.train.txt").read_text(encoding="utf-8").splitlines() == sorted([
        "使用「查找」工具栏可以快速搜索 LibreOffice 文档中的内容。", "将光标移动到上一个匹配的搜索文本处。"])
    info = json.loads((out / "fetch_info.json").read_text())
    assert info["languages"] == ["en", "de", "zh-cn"] and info["para"]["en-de"]["train"] == 4
    assert "Not help text" not in "".join(p.read_text() for p in (out / "mono").iterdir())
    assert "en-de" in result.stdout and "zh-cn" in result.stdout  # the count tables


def test_command_line_refuses_to_overwrite_a_corpus_and_names_uncached_packages(tmp_path, run):
    _fake_cache(tmp_path / "cache")
    out = tmp_path / "raw"
    args = ["--offline", "--cache-dir", tmp_path / "cache", "--workers", "1"]
    assert run("fetch_libreoffice.py", *args, "--out", out, "--langs", "en", "de").returncode == 0
    before = folder_hashes(out)

    again = run("fetch_libreoffice.py", *args, "--out", out, "--langs", "en", "de")
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert f"output folder {out} already holds a RAW corpus; pass --force" in again.stderr

    missing = run("fetch_libreoffice.py", *args, "--out", out, "--force", "--langs", "en", "fr")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "not in the cache" in missing.stderr and "libreoffice-help-fr" in missing.stderr
    assert folder_hashes(out) == before
