#!/usr/bin/env python
"""Write a small synthetic corpus, binarized for fairseq's `masked_lm` task, in a few seconds.

    python scripts/make_toy_data.py OUT_DIR [--train-lines 2000] [--valid-lines 200]

OUT_DIR gets dict.txt, train.{bin,idx}, valid.{bin,idx} and the raw text (train.txt,
valid.txt). Each "language" has its own words and a rule for the next word (word i is followed
by word i + step, mostly), so a masked token is predictable from its neighbours and an MLM's
loss falls within a few dozen updates: enough to smoke-test training, resuming and routing
without the real corpus.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

LANGUAGES = {"aa": 1, "bb": 2, "cc": 3, "dd": 5}  # language -> step of its next-word rule
WORDS_PER_LANGUAGE = 24
RULE_PROBABILITY = 0.9  # otherwise a random word of the same language


def make_sentence(rng: random.Random) -> list[str]:
    language, step = rng.choice(sorted(LANGUAGES.items()))
    word = rng.randrange(WORDS_PER_LANGUAGE)
    sentence = []
    for _ in range(rng.randint(6, 30)):
        sentence.append(f"{language}{word}")
        if rng.random() < RULE_PROBABILITY:
            word = (word + step) % WORDS_PER_LANGUAGE
        else:
            word = rng.randrange(WORDS_PER_LANGUAGE)
    return sentence


def binarize(lines: list[list[str]], dictionary, prefix: Path) -> None:
    import torch
    from fairseq.data import indexed_dataset

    builder = indexed_dataset.make_builder(f"{prefix}.bin", impl="mmap", vocab_size=len(dictionary))
    for words in lines:
        ids = [dictionary.index(w) for w in words] + [dictionary.eos()]
        builder.add_item(torch.tensor(ids, dtype=torch.int64))
    builder.finalize(f"{prefix}.idx")


def write_toy_corpus(out_dir: Path, train_lines: int = 2000, valid_lines: int = 200, seed: int = 1) -> str:
    """Write the corpus to out_dir; returns a one-line summary."""
    from fairseq.data import Dictionary

    rng = random.Random(seed)
    splits = {
        "train": [make_sentence(rng) for _ in range(train_lines)],
        "valid": [make_sentence(rng) for _ in range(valid_lines)],
    }
    out_dir.mkdir(parents=True, exist_ok=True)

    dictionary = Dictionary()
    for words in splits["train"]:
        for word in words:
            dictionary.add_symbol(word)
    dictionary.finalize()  # sorts by count, as fairseq-preprocess does
    dictionary.save(str(out_dir / "dict.txt"))

    for split, lines in splits.items():
        (out_dir / f"{split}.txt").write_text("".join(" ".join(w) + "\n" for w in lines))
        binarize(lines, dictionary, out_dir / split)
    sizes = ", ".join(f"{split} {len(lines)} lines" for split, lines in splits.items())
    return f"wrote {out_dir}: {len(dictionary)} symbols, {sizes}"


RAW_LANGUAGES = {"en": 1, "de": 2, "fr": 3}  # language -> step of its next-word rule
RAW_SPLITS = {"train": 1.0, "valid": 0.1, "test": 0.1}  # split -> size relative to train


def write_toy_raw(out_dir: Path, train_lines: int = 2000, seed: int = 1) -> str:
    """Write a synthetic corpus in data-prep's RAW layout (docs/CONTRACTS.md): monolingual text
    per language and en-X "translations" (the same word indices in the other language's words),
    so MLM and TLM both have something to learn. Returns a one-line summary."""
    rng = random.Random(seed)

    def indices(step: int) -> list[int]:
        word, out = rng.randrange(WORDS_PER_LANGUAGE), []
        for _ in range(rng.randint(6, 20)):
            out.append(word)
            word = (word + step) % WORDS_PER_LANGUAGE if rng.random() < RULE_PROBABILITY else rng.randrange(WORDS_PER_LANGUAGE)
        return out

    def words(language: str, sentence: list[int]) -> str:
        return " ".join(f"{language}{i}" for i in sentence)

    (out_dir / "mono").mkdir(parents=True, exist_ok=True)
    (out_dir / "para").mkdir(parents=True, exist_ok=True)
    for split, scale in RAW_SPLITS.items():
        count = max(1, int(train_lines * scale))
        for language, step in RAW_LANGUAGES.items():
            lines = [words(language, indices(step)) for _ in range(count)]
            (out_dir / "mono" / f"{language}.{split}.txt").write_text("\n".join(lines) + "\n")
        for target in [lang for lang in RAW_LANGUAGES if lang != "en"]:
            sentences = [indices(1) for _ in range(count)]
            for language in ("en", target):
                text = "\n".join(words(language, s) for s in sentences) + "\n"
                (out_dir / "para" / f"en-{target}.{split}.{language}").write_text(text)
    return f"wrote RAW corpus {out_dir}: {len(RAW_LANGUAGES)} languages, {train_lines} train lines each"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="folder to write the binarized corpus to")
    parser.add_argument(
        "--raw", action="store_true",
        help="write text in data-prep's RAW layout (mono/{lang}.{split}.txt, para/en-X.{split}.{lang}) "
        "instead of a binarized masked_lm corpus",
    )
    parser.add_argument("--train-lines", type=int, default=2000, help="sentences in the train split")
    parser.add_argument("--valid-lines", type=int, default=200, help="sentences in the valid split")
    parser.add_argument("--seed", type=int, default=1, help="random seed (same seed, same corpus)")
    args = parser.parse_args()
    if args.raw:
        print(write_toy_raw(args.out_dir, args.train_lines, args.seed))
    else:
        print(write_toy_corpus(args.out_dir, args.train_lines, args.valid_lines, args.seed))


if __name__ == "__main__":
    main()
