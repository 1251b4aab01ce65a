"""build_topic_task.py: LibreOffice help pages -> a zero-shot topic classification task (the
page's module), split by page, written as xmoe-finetune TSVs with a manifest."""
from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from .dataprep_helpers import (
    DATA_PREP, TOPIC_MODULE_WORDS, UNTRANSLATED, folder_hashes, topic_help_pages, topic_page_body,
    write_help_cache)

MAX_WORDS = 12


@pytest.fixture(scope="module")
def build():
    """The script as a module, for its split function."""
    spec = importlib.util.spec_from_file_location("build_topic_task", DATA_PREP / "build_topic_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def help_pages(build) -> tuple[dict[str, dict[str, str]], str]:
    """{lang: {path: body}} for every module; the English text of one held-out page is made equal
    to that of a train page of another module (returns that held-out page's path)."""
    pages = topic_help_pages(pages_per_module=15)
    split = {path: build.split_of(path, 10.0, 40.0) for path in pages["en"]}
    train_page = next(p for p in pages["en"] if split[p] == "train" and "/scalc/" in p)
    copied = next(p for p in pages["en"] if split[p] == "test" and "/swriter/" in p)
    for lang in pages:
        pages[lang][copied] = pages[lang][train_page]
    for lang in pages:  # a page outside the nine modules
        pages[lang]["text/sfoo/01/other.html"] = topic_page_body("shared", 99, lang)
    return pages, copied


def read_rows(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "label\ttext"
    return [tuple(line.split("\t")) for line in lines[1:]]


@pytest.fixture(scope="module")
def task(build, tmp_path_factory):
    from .dataprep_helpers import run_script

    root = tmp_path_factory.mktemp("topic")
    pages, copied = help_pages(build)
    write_help_cache(root / "cache", pages)
    result = run_script("build_topic_task.py", "--offline", "--cache-dir", root / "cache", "--out",
                        root / "topic", "--langs", "en", "de", "zh-cn", "--max-words", str(MAX_WORDS),
                        "--workers", "1")
    assert result.returncode == 0, result.stderr
    return root / "topic", copied, result


def test_split_is_by_page_and_no_test_page_is_trained_on(task, build):
    out, _, _ = task
    pages = json.loads((out / "pages.json").read_text())
    seen = set(pages["train"]) | set(pages["dev"])
    assert set(pages["train"]).isdisjoint(pages["dev"])
    for lang in ("en", "de", "zh-cn"):
        assert pages["test"][lang] and seen.isdisjoint(pages["test"][lang])
        for page in pages["test"][lang]:
            assert build.split_of(page, 10.0, 40.0) == "test"
    assert all(build.split_of(p, 10.0, 40.0) == "train" for p in pages["train"])
    # the same page set in every language: each page has a translated text everywhere here
    assert pages["test"]["de"] == pages["test"]["en"] == pages["test"]["zh-cn"]


def test_rows_carry_the_module_of_their_page_and_the_manifest_counts_them(task):
    out, _, result = task
    manifest = json.loads((out / "manifest.json").read_text())
    pages = json.loads((out / "pages.json").read_text())
    assert manifest["labels"] == sorted(TOPIC_MODULE_WORDS) and manifest["unit"] == "page"
    assert manifest["languages"] == ["en", "de", "zh-cn"] and manifest["train_language"] == "en"
    files = [("train", out / "en.train.tsv", pages["train"]), ("dev", out / "en.dev.tsv", pages["dev"])]
    files += [(lang, out / f"{lang}.test.tsv", pages["test"][lang]) for lang in ("en", "de", "zh-cn")]
    for name, path, page_list in files:
        rows = read_rows(path)
        assert [label for label, _ in rows] == [p.split("/")[1] for p in page_list]
        size = manifest["sizes"]["test"][name] if name in pages["test"] else manifest["sizes"][name]
        counts = manifest["label_counts"]["test"][name] if name in pages["test"] else manifest["label_counts"][name]
        assert size == len(rows) and counts == dict(Counter(label for label, _ in rows))
    assert manifest["dropped"]["pages_outside_the_modules"] == 1
    assert "en.train.tsv" in result.stdout and "zh-cn.test.tsv" in result.stdout  # the count table


def test_page_text_leaves_out_untranslated_paragraphs_and_is_cut(task):
    out, _, _ = task
    pages = json.loads((out / "pages.json").read_text())
    de_rows = dict(zip(pages["test"]["de"], read_rows(out / "de.test.tsv")))
    en_rows = dict(zip(pages["test"]["en"], read_rows(out / "en.test.tsv")))
    zh_rows = dict(zip(pages["test"]["zh-cn"], read_rows(out / "zh-cn.test.tsv")))
    untranslated_pages = [p for p in de_rows if p.endswith(("page0.html", "page3.html", "page6.html"))]
    assert untranslated_pages
    for page in untranslated_pages:
        assert UNTRANSLATED in en_rows[page][1]  # English keeps its own paragraph
        assert UNTRANSLATED not in de_rows[page][1]
    for _, text in de_rows.values():
        assert len(text.split()) <= MAX_WORDS
    for _, text in zh_rows.values():
        assert len(text.replace(" ", "")) <= 2 * MAX_WORDS


def test_a_held_out_page_with_the_text_of_a_train_page_is_dropped(task):
    out, copied, _ = task
    manifest = json.loads((out / "manifest.json").read_text())
    pages = json.loads((out / "pages.json").read_text())
    assert manifest["dropped"]["held_out_pages_duplicating_a_train_text"] == 1
    assert copied not in pages["test"]["en"] and copied not in pages["dev"]
    train_texts = {text for _, text in read_rows(out / "en.train.tsv")}
    assert not train_texts & {text for _, text in read_rows(out / "en.test.tsv")}


def test_refuses_to_overwrite_and_rejects_bad_options_with_a_message(task, run):
    out, _, _ = task
    cache = out.parent / "cache"
    before = folder_hashes(out)
    again = run("build_topic_task.py", "--offline", "--cache-dir", cache, "--out", out, "--workers", "1",
                "--langs", "en", "de")
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert f"output folder {out} already holds a topic task; pass --force" in again.stderr
    bad = run("build_topic_task.py", "--offline", "--cache-dir", cache, "--out", out / "x",
              "--test-percent", "95")
    assert bad.returncode == 2 and "--dev-percent and --test-percent" in bad.stderr
    missing = run("build_topic_task.py", "--offline", "--cache-dir", cache, "--out", out.parent / "fr",
                  "--langs", "en", "fr", "--workers", "1")
    assert missing.returncode == 2 and "libreoffice-help-fr" in missing.stderr
    assert folder_hashes(out) == before and not (out.parent / "fr").exists()
