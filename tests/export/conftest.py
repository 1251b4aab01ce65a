"""One tiny X-MoE encoder pre-trained for a few updates on generated text, shared by every test
in this folder: RAW corpus -> data-prep (sentencepiece + binarize) -> fairseq-train with the
xmoe_mlm_tlm task and language embeddings -> xmoe-export. About 25 s once per session.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from data_prep.dataprep_helpers import LANGS, make_sentence, run_script, write_raw_corpus

TRAIN_UPDATES = 8

# transformers must never reach for a hub: every model and tokenizer here is a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Pretrained:
    raw: Path  # RAW corpus (docs/CONTRACTS.md)
    data: Path  # binarized DATA folder with manifest.json, spm.model, dict.txt
    checkpoint: Path  # fairseq checkpoint_last.pt
    exported: Path  # xmoe-export output


def pretrain_args(cli, data: Path, save_dir: Path, max_update: int = TRAIN_UPDATES) -> list:
    """A tiny xmoe_mlm_tlm run on CPU (3 languages, language embeddings, MLM and TLM batches)."""
    return [
        data,
        "--user-dir", cli.user_dir,
        "--task", "xmoe_mlm_tlm", "--criterion", "xmoe_masked_lm", "--arch", "xmoe_tiny",
        "--num-languages", str(len(LANGS)), "--tokens-per-sample", "64",
        "--batch-size", "8", "--num-workers", "0", "--cpu", "--seed", "1",
        "--optimizer", "adam", "--lr", "0.005", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "2",
        "--max-update", str(max_update), "--disable-validation",
        "--save-dir", save_dir, "--no-epoch-checkpoints", "--log-format", "json", "--log-interval", "2",
    ]


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory) -> tuple[Path, Path]:
    """(RAW corpus, binarized DATA) made by data-prep's own scripts."""
    root = tmp_path_factory.mktemp("pretrain")
    raw = write_raw_corpus(root / "raw")
    spm = run_script("train_spm.py", "--raw", raw, "--out", root / "spm", "--vocab-size", "300",
                     "--sentences-per-language", "200", "--threads", "1")
    assert spm.returncode == 0, spm.stderr
    binarized = run_script("binarize.py", "--raw", raw, "--spm-model", root / "spm" / "spm.model",
                           "--dict", root / "spm" / "dict.txt", "--out", root / "data", "--workers", "1")
    assert binarized.returncode == 0, binarized.stderr
    return raw, root / "data"


@pytest.fixture(scope="session")
def pretrained(cli, pretrain_data, tmp_path_factory) -> Pretrained:
    from xmoe.export import export

    raw, data = pretrain_data
    root = tmp_path_factory.mktemp("pretrained")
    run = cli.run([cli.bin / "fairseq-train", *pretrain_args(cli, data, root / "ckpt")], timeout=240,
                  log_file=root / "train.log")
    cli.ok(run)
    checkpoint = root / "ckpt" / "checkpoint_last.pt"
    exported = export(str(checkpoint), str(root / "exported"), data_dir=str(data), log=lambda *_: None)
    return Pretrained(raw, data, checkpoint, exported)


@pytest.fixture(scope="session")
def fairseq_model(pretrained):
    """The checkpoint as fairseq itself loads it (checkpoint_utils + the plugin), in eval mode."""
    from fairseq import checkpoint_utils

    # xmoe registers its fairseq components on import only when fairseq is loaded already;
    # here xmoe may have come first, so import the plugin modules explicitly.
    from xmoe import criterions, models, tasks  # noqa: F401
    from xmoe.checkpoint import allow_fairseq_checkpoint_globals

    allow_fairseq_checkpoint_globals()  # fairseq's torch.load runs under torch's weights_only default
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(pretrained.checkpoint)])
    return models[0].eval(), task


def sample_texts(seed: int = 0) -> tuple[list[str], list[str]]:
    """(sentences of different lengths, their languages): one per language, twice."""
    import random

    rng = random.Random(seed)
    langs = [lang for _ in range(2) for lang in LANGS]
    return [make_sentence(lang, rng) for lang in langs], langs


@pytest.fixture(scope="session")
def texts_and_langs() -> tuple[list[str], list[str]]:
    return sample_texts()


def max_difference(a: torch.Tensor, b: torch.Tensor, padding_mask_BT: torch.Tensor) -> float:
    """Largest |a - b| over real (non-padding) positions of (B, T, ...) tensors."""
    keep = ~padding_mask_BT
    return float((a[keep] - b[keep]).abs().max())


@pytest.fixture(scope="module")
def remote_code_cache(tmp_path_factory):
    """transformers copies remote code into HF_MODULES_CACHE: a private one for the tests."""
    from transformers import dynamic_module_utils

    patch = pytest.MonkeyPatch()
    patch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))
    yield
    patch.undo()


def load_auto(auto_class, folder, **kwargs):
    """auto_class.from_pretrained(folder) with the folder's remote code; asserts that every
    weight of the folder was used and none but a new task head's was missing."""
    model, info = auto_class.from_pretrained(str(folder), trust_remote_code=True, output_loading_info=True, **kwargs)
    head = "classifier."
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert all(key.startswith(head) for key in info["missing_keys"]), info
    return model


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train faster on one thread; more only contend (several times slower on a busy
    2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
