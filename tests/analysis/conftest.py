"""Fixtures for the analysis commands: a tiny binarized corpus (train/valid/test, mono and
para) and an xmoe_tiny model trained on it for a few updates by fairseq-train, once per session,
plus checkpoint files derived from it (re-drawn routers, a dense model, a foreign model).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

LANGUAGES = ["en", "de", "fr"]
PAIRS = ["en-de", "en-fr"]
MONO_LINES = {"train": 240, "valid": 40, "test": 20}
PARA_LINES = {"train": 160, "valid": 24, "test": 30}
NUM_SYMBOLS = 48  # regular dictionary entries besides fairseq's 4 specials
LINE_LENGTHS = (4, 14)  # tokens per line, </s> not counted
TRAIN_UPDATES = 10


def build_dictionary():
    from fairseq.data import Dictionary

    dictionary = Dictionary()
    for i in range(NUM_SYMBOLS):
        dictionary.add_symbol(f"\u2581t{i}", n=NUM_SYMBOLS - i)
    return dictionary


def write_dataset(prefix: Path, lines: list[list[int]]) -> None:
    from fairseq.data.indexed_dataset import MMapIndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = MMapIndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for line in lines:
        builder.add_item(torch.tensor(line, dtype=torch.long))
    builder.finalize(str(prefix) + ".idx")


def distinct_lines(rng: np.random.Generator, count: int, first_id: int, last_id: int, eos: int,
                   taken: set) -> list[list[int]]:
    """`count` random lines never seen before (ids in [first_id, last_id]), each ending in </s>."""
    lines = []
    while len(lines) < count:
        length = int(rng.integers(LINE_LENGTHS[0], LINE_LENGTHS[1] + 1))
        line = tuple(int(i) for i in rng.integers(first_id, last_id + 1, size=length)) + (eos,)
        if line not in taken:
            taken.add(line)
            lines.append(list(line))
    return lines


def noisy_copy(rng: np.random.Generator, line: list[int], first_id: int, last_id: int, taken: set) -> list[int]:
    """A "translation": the line with about a third of its tokens replaced (</s> kept), so
    that retrieval has something to find, yet not trivially. Distinct from every line so far."""
    while True:
        body = np.array(line[:-1])
        replaced = rng.random(len(body)) < 1 / 3
        body[replaced] = rng.integers(first_id, last_id + 1, size=int(replaced.sum()))
        candidate = tuple(int(i) for i in body) + (line[-1],)
        if candidate not in taken:
            taken.add(candidate)
            return list(candidate)


def make_corpus(root: Path, seed: int = 0, extra_symbols: int = 0) -> Path:
    """DATA in the layout of docs/CONTRACTS.md. extra_symbols > 0 grows the dictionary (a corpus
    that does not match a model trained on the default one)."""
    rng = np.random.default_rng(seed)
    dictionary = build_dictionary()
    for i in range(extra_symbols):
        dictionary.add_symbol(f"\u2581extra{i}", n=1)
    root.mkdir(parents=True, exist_ok=True)
    dictionary.save(str(root / "dict.txt"))
    first, last = dictionary.nspecial, dictionary.nspecial + NUM_SYMBOLS - 1
    taken: set = set()
    sizes = {}
    for split in MONO_LINES:
        for lang in LANGUAGES:
            write_dataset(root / "mono" / lang / split,
                          distinct_lines(rng, MONO_LINES[split], first, last, dictionary.eos(), taken))
        for pair in PAIRS:
            src, tgt = pair.split("-")
            src_lines = distinct_lines(rng, PARA_LINES[split], first, last, dictionary.eos(), taken)
            write_dataset(root / "para" / pair / f"{split}.{src}", src_lines)
            write_dataset(root / "para" / pair / f"{split}.{tgt}",
                          [noisy_copy(rng, line, first, last, taken) for line in src_lines])
        sizes[split] = {"mono": dict.fromkeys(LANGUAGES, MONO_LINES[split]),
                        "para": dict.fromkeys(PAIRS, PARA_LINES[split])}
    manifest = {"format_version": 1, "languages": LANGUAGES, "pairs": PAIRS, "spm_model": "spm.model",
                "dictionary": "dict.txt", "sizes": sizes}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="session")
def analysis_corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("analysis_corpus"))


@dataclass
class TrainedRun:
    early: Path  # checkpoint after TRAIN_UPDATES // 2 updates
    last: Path  # checkpoint after TRAIN_UPDATES updates


@pytest.fixture(scope="session")
def trained_run(cli, analysis_corpus, tmp_path_factory) -> TrainedRun:
    """xmoe_tiny (2 MoE layers of 4 experts, language embeddings) trained with xmoe_mlm_tlm."""
    save_dir = tmp_path_factory.mktemp("analysis_run") / "checkpoints"
    args = [
        cli.bin / "fairseq-train", analysis_corpus, "--user-dir", cli.user_dir,
        "--task", "xmoe_mlm_tlm", "--criterion", "xmoe_masked_lm", "--arch", "xmoe_tiny",
        "--num-languages", str(len(LANGUAGES)), "--tokens-per-sample", "32",
        "--batch-size", "8", "--num-workers", "0", "--cpu", "--seed", "1",
        "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "0.01",
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "2",
        "--max-update", str(TRAIN_UPDATES), "--save-interval-updates", str(TRAIN_UPDATES // 2),
        "--disable-validation", "--save-dir", save_dir, "--no-epoch-checkpoints",
        "--log-format", "json", "--log-interval", "5",
    ]
    cli.ok(cli.run(args, timeout=240, log_file=save_dir.parent / "train.log"))

    def saved_at(update: int) -> Path:
        found = sorted(save_dir.glob(f"checkpoint_*_{update}.pt"))
        assert found, f"no checkpoint for update {update} in {sorted(os.listdir(save_dir))}"
        return found[0]

    return TrainedRun(early=saved_at(TRAIN_UPDATES // 2), last=saved_at(TRAIN_UPDATES))


def read_checkpoint(path: Path) -> dict:
    from xmoe.checkpoint import load_checkpoint_file

    return load_checkpoint_file(str(path))


REDRAWS = 4  # independent router re-initialisations (seeds 0..3)


@pytest.fixture(scope="session")
def redrawn_router_checkpoints(trained_run, tmp_path_factory) -> list[Path]:
    """The last checkpoint with every router parameter (token projection, expert embeddings,
    temperature) re-initialised, once per seed 0..REDRAWS-1; everything else unchanged."""
    from xmoe.checkpoint import load_encoder
    from xmoe.encoder import XMoEEncoder

    _, config, _ = load_encoder(str(trained_run.last))
    folder = tmp_path_factory.mktemp("redrawn")
    paths = []
    for seed in range(REDRAWS):
        torch.manual_seed(seed)
        fresh = XMoEEncoder(config).state_dict()  # the routers' own initialisation
        state = read_checkpoint(trained_run.last)
        router_keys = [key for key in state["model"] if ".ffn.router." in key]
        assert len(router_keys) == 2 * 3  # projection, expert embeddings and tau of both MoE layers
        for key in router_keys:
            state["model"][key] = fresh[key[len("encoder."):]].clone()
        paths.append(folder / f"redrawn_router_seed{seed}.pt")
        torch.save(state, paths[-1])
    return paths


@pytest.fixture(scope="session")
def dense_checkpoint(trained_run, tmp_path_factory) -> Path:
    """A dense_tiny encoder (no MoE layer) in the checkpoint format of the trained run."""
    from xmoe.encoder import EncoderConfig, XMoEEncoder

    state = read_checkpoint(trained_run.last)
    vocab_size = state["model"]["encoder.embed_tokens.weight"].shape[0]
    encoder = XMoEEncoder(EncoderConfig(vocab_size=vocab_size, padding_idx=1, num_languages=len(LANGUAGES)))
    state["cfg"] = copy.deepcopy(state["cfg"])
    state["cfg"]["model"].update({"_name": "dense_tiny", "moe_experts": 0, "moe_freq": 0, "moe_layers": ""})
    state["model"] = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    path = tmp_path_factory.mktemp("dense") / "dense.pt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def foreign_checkpoint(tmp_path_factory) -> Path:
    """A fairseq-style checkpoint of some other model."""
    path = tmp_path_factory.mktemp("foreign") / "roberta.pt"
    torch.save({"cfg": {"model": {"_name": "roberta_base"}}, "model": {"encoder.w": torch.zeros(2)}}, path)
    return path
