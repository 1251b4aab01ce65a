"""Helpers for the training-lifecycle tests: fairseq-train command lines, log records, checkpoints."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Optional

import torch

from xmoe.checkpoint import load_checkpoint_file

REPO_ROOT = Path(__file__).resolve().parents[2]
TORCHRUN_WRAPPER = REPO_ROOT / "scripts" / "fairseq_train_torchrun.py"
RECORD_LOADED_STATE = Path(__file__).resolve().parent / "record_loaded_state.py"

# train_inner keys that measure time, not training: they differ between identical runs.
TIMING_KEYS = {"wps", "ups", "wall", "train_wall", "gb_free"}
EXPERT_KEY_MARK = ".ffn.experts."


def set_option(args: list, option: str, value) -> list:
    """args with `option` set to `value` (replaced when present, appended otherwise)."""
    args = list(args)
    if option in args:
        args[args.index(option) + 1] = str(value)
    else:
        args += [option, str(value)]
    return args


def lifecycle_train_args(cli, data: Path, save_dir: Path, max_update: int, batch_size: int = 16) -> list:
    """The shared fast CPU run (conftest.fairseq_train_args) with dropout on (so the random state
    matters for resume), every update logged, and a checkpoint only at the end of each run."""
    args = cli.train_args(data, save_dir, max_update=max_update)
    for option, value in (
        ("--dropout", 0.1),
        ("--attention-dropout", 0.1),
        ("--log-interval", 1),
        ("--batch-size", batch_size),
    ):
        args = set_option(args, option, value)
    return args


def torchrun_command(cli, nproc: int, args: list, script: Path = TORCHRUN_WRAPPER, script_args: tuple = ()) -> list:
    return [cli.bin / "torchrun", "--standalone", "--nproc-per-node", str(nproc), script, *script_args, *args]


def comparable_records(run, tag: str = "train_inner") -> list[dict]:
    """JSON log records without timing and routing-fluctuation values (the probe batch is
    re-established on resume, see xmoe/criterions/xmoe_masked_lm.py)."""
    return [
        {k: v for k, v in record.items() if k not in TIMING_KEYS and not k.endswith("_rf")}
        for record in run.json_logs(tag)
    ]


def losses(run) -> list[float]:
    return [float(r["loss"]) for r in run.json_logs("train_inner")]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def num_updates(checkpoint: dict) -> int:
    return int(checkpoint["optimizer_history"][-1]["num_updates"])


def tensor_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Paths of tensors (and other leaves) that differ between two nested checkpoint structures."""
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = [f"{prefix}{k} (missing on one side)" for k in set(a) ^ set(b)]
        for key in sorted(set(a) & set(b), key=str):
            diffs += tensor_differences(a[key], b[key], f"{prefix}{key}.")
        return diffs
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{prefix} (lengths {len(a)} != {len(b)})"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in tensor_differences(x, y, f"{prefix}{i}.")]
    if torch.is_tensor(a) or torch.is_tensor(b):
        same = torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [prefix.rstrip(".")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [prefix.rstrip(".")]


def expert_keys(model_state: dict) -> list[str]:
    return sorted(k for k in model_state if EXPERT_KEY_MARK in k)


def router_keys(model_state: dict) -> list[str]:
    return sorted(k for k in model_state if ".ffn.router." in k)


def load(path: Path) -> dict:
    """A checkpoint read the safe way (weights_only, allow-list), as every loader here does."""
    return load_checkpoint_file(str(path))


def copy_save_dir(src: Path, dst: Path, only: Optional[list[str]] = None) -> Path:
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if only is None or path.name in only:
            shutil.copy2(path, dst / path.name)
    return dst
