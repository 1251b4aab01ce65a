"""A tiny binarized corpus in the layout of docs/CONTRACTS.md, and task builders.

Three languages of different sizes (so re-balancing is visible) and two pairs, lines
of random dictionary ids ending in </s>, written with fairseq's own Dictionary and
MMapIndexedDatasetBuilder, with a format_version 2 manifest as binarize.py writes it.
"""

import json
import os
import shutil
from typing import Callable, Dict, List, Optional, Sequence

import fairseq  # noqa: F401  (loaded first so that xmoe registers its components)
import numpy as np
import pytest
import torch
from fairseq.data import Dictionary
from fairseq.data.indexed_dataset import MMapIndexedDatasetBuilder

from xmoe.tasks.mlm_tlm import MlmTlmConfig, MlmTlmTask

LANGUAGES = ["en", "de", "fr"]
PAIRS = ["en-de", "en-fr"]
TRAIN_LINES = {"en": 400, "de": 200, "fr": 60}
TRAIN_PAIRS = {"en-de": 300, "en-fr": 80}
VALID_LINES = {"en": 30, "de": 20, "fr": 10}
VALID_PAIRS = {"en-de": 24, "en-fr": 12}
NUM_WORD_STARTS, NUM_CONTINUATIONS = 40, 20


def build_dictionary() -> Dictionary:
    """Sentencepiece-like pieces: '▁w{i}' begin a word, 'c{i}' continue one."""
    d = Dictionary()
    for i in range(NUM_WORD_STARTS):
        d.add_symbol(f"\u2581w{i}", n=100)
    for i in range(NUM_CONTINUATIONS):
        d.add_symbol(f"c{i}", n=50)
    return d


def write_lines(prefix: str, lines: Sequence[torch.Tensor]) -> Dict[str, int]:
    """Write one dataset; returns what binarize.py records for it in manifest.json's "files"."""
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for line in lines:
        builder.add_item(line)
    builder.finalize(prefix + ".idx")
    return {
        "items": len(lines),
        "bin_bytes": os.path.getsize(prefix + ".bin"),
        "max_id": max(int(line.max()) for line in lines),
    }


def random_lines(
    rng: np.random.Generator, d: Dictionary, count: int, min_len: int, max_len: int
) -> list:
    """`count` lines of regular ids, each followed by </s> as fairseq-preprocess writes them."""
    lines = []
    for _ in range(count):
        length = int(rng.integers(min_len, max_len + 1))
        ids = rng.integers(d.nspecial, len(d), size=length)
        lines.append(torch.tensor(list(ids) + [d.eos()], dtype=torch.long))
    return lines


def make_binarized(
    root: str,
    train_lines: Optional[Dict[str, int]] = None,
    train_pairs: Optional[Dict[str, int]] = None,
    valid_lines: Optional[Dict[str, int]] = None,
    valid_pairs: Optional[Dict[str, int]] = None,
    line_len=(3, 12),
    seed: int = 0,
) -> str:
    """Write DATA under `root` and return its path (counts: lines per language / pair)."""
    train_lines = dict(TRAIN_LINES if train_lines is None else train_lines)
    train_pairs = dict(TRAIN_PAIRS if train_pairs is None else train_pairs)
    valid_lines = dict(VALID_LINES if valid_lines is None else valid_lines)
    valid_pairs = dict(VALID_PAIRS if valid_pairs is None else valid_pairs)
    rng = np.random.default_rng(seed)
    d = build_dictionary()
    os.makedirs(root, exist_ok=True)
    d.save(os.path.join(root, "dict.txt"))
    sizes, files = {}, {}
    for split, mono_counts, para_counts in (
        ("train", train_lines, train_pairs),
        ("valid", valid_lines, valid_pairs),
    ):
        for lang, count in mono_counts.items():
            stem = f"mono/{lang}/{split}"
            files[stem] = write_lines(os.path.join(root, stem), random_lines(rng, d, count, *line_len))
        for pair, count in para_counts.items():
            src, tgt = pair.split("-")
            for lang in (src, tgt):
                stem = f"para/{pair}/{split}.{lang}"
                files[stem] = write_lines(
                    os.path.join(root, stem), random_lines(rng, d, count, *line_len)
                )
        sizes[split] = {"mono": mono_counts, "para": para_counts}
    manifest = {
        "format_version": 2,
        "languages": list(LANGUAGES),
        "pairs": sorted(train_pairs),
        "spm_model": "spm.model",
        "dictionary": "dict.txt",
        "dictionary_size": len(d),
        "sizes": sizes,
        "files": files,
    }
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return root


def make_task(data: str, **options) -> MlmTlmTask:
    """The task as fairseq would set it up (seed and train subset filled in by hand,
    since outside fairseq nothing resolves their ${common.seed} interpolations)."""
    options.setdefault("seed", 1)
    options.setdefault("train_subset", "train")
    cfg = MlmTlmConfig(data=data, **options)
    return MlmTlmTask.setup_task(cfg)


def collect_batches(
    task: MlmTlmTask,
    split: str,
    epoch: int = 1,
    max_tokens: int = 2048,
    max_sentences: int = 8,
    num_shards: int = 1,
    shard_id: int = 0,
    required_batch_size_multiple: int = 1,
) -> List[dict]:
    """Every batch one worker gets in one epoch, through fairseq's epoch iterator."""
    iterator = task.get_batch_iterator(
        task.dataset(split), max_tokens=max_tokens, max_sentences=max_sentences,
        max_positions=task.max_positions(), seed=1, num_shards=num_shards, shard_id=shard_id,
        epoch=epoch, required_batch_size_multiple=required_batch_size_multiple,
    )
    return list(iterator.next_epoch_itr(shuffle=True))


def mlm_tlm_train_args(cli, data: str, save_dir, **options) -> list:
    """fairseq-train options for a short CPU run of this task on `data` (the shared fast run of
    tests/conftest.py with the task swapped in); options map "--batch-size" style names to values."""
    args = [str(a) for a in cli.train_args(data, save_dir)]
    args.remove("--sample-break-mode"), args.remove("complete")  # a masked_lm option
    options = {"--task": "xmoe_mlm_tlm", "--tokens-per-sample": 32, **options}
    for option, value in options.items():
        if option in args:
            args[args.index(option) + 1] = str(value)
        else:
            args += [option, str(value)]
    return args


# Fixtures hand out the helpers, so test files need not import this module by name.
@pytest.fixture
def new_task() -> Callable[..., MlmTlmTask]:
    return make_task


@pytest.fixture
def batches_of() -> Callable[..., List[dict]]:
    return collect_batches


@pytest.fixture
def binarize() -> Callable[..., str]:
    return make_binarized


@pytest.fixture
def own_data_dir(data_dir, tmp_path) -> str:
    """A private copy of the corpus that a test may break."""
    return shutil.copytree(data_dir, str(tmp_path / "data"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    return make_binarized(str(tmp_path_factory.mktemp("xmoe_data")))


@pytest.fixture(scope="session")
def long_data_dir(tmp_path_factory) -> str:
    """Lines far longer than the tests' tokens_per_sample."""
    return make_binarized(str(tmp_path_factory.mktemp("xmoe_long")), line_len=(20, 90), seed=1)
