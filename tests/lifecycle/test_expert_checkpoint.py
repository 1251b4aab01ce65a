"""xmoe.expert_checkpoint's pieces in one process: optimizer-state gather/slice, atomic copies, the
optimizer-build guard. (Multi-process saving and loading: test_resume.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import fairseq  # noqa: F401
import pytest
import torch
from fairseq import file_io
from fairseq.trainer import Trainer
from torch import nn

import xmoe.expert_checkpoint as expert_checkpoint
import xmoe.models  # noqa: F401  (installs the patches)
from xmoe.expert_checkpoint import (
    gather_expert_optimizer_state,
    keep_in_optimizer,
    slice_expert_optimizer_state,
    uses_flat_fp16_optimizer,
)

TOTAL_EXPERTS = 4


def _expert_param(first: int, local: int) -> nn.Parameter:
    param = nn.Parameter(torch.randn(local, 3))
    param.expert = True
    param.expert_slice = (first, local, TOTAL_EXPERTS)
    return param


def _stepped_adam(params) -> torch.optim.Adam:
    optimizer = torch.optim.Adam(params)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    return optimizer


def test_gathering_for_a_checkpoint_leaves_the_running_optimizer_state_alone(monkeypatch):
    expert, dense = _expert_param(first=0, local=2), nn.Parameter(torch.randn(5))
    optimizer = _stepped_adam([expert, dense])
    live_moment = optimizer.state[expert]["exp_avg"]
    # Stand-in for the all-gather over 2 ranks: this rank's 2 experts and the other rank's 2.
    monkeypatch.setattr(expert_checkpoint, "gather_expert_shards", lambda local, group: torch.cat([local, local + 1]))

    state = optimizer.state_dict()
    gather_expert_optimizer_state(optimizer, state, ep_group=object())

    assert state["state"][0]["exp_avg"].shape == (4, 3)
    assert torch.equal(state["state"][0]["exp_avg"][:2], live_moment)
    assert optimizer.state[expert]["exp_avg"] is live_moment and live_moment.shape == (2, 3)
    assert state["state"][1]["exp_avg"].shape == (5,)  # dense: untouched


def test_loading_keeps_this_ranks_slice_of_the_experts_optimizer_state():
    expert = _expert_param(first=2, local=1)
    optimizer = torch.optim.Adam([expert])
    full = torch.arange(12.0).view(4, 3)
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": full, "exp_avg_sq": full * 2}},
             "param_groups": optimizer.state_dict()["param_groups"]}
    slice_expert_optimizer_state(optimizer, state)
    assert torch.equal(state["state"][0]["exp_avg"], full[2:3])
    assert torch.equal(state["state"][0]["exp_avg_sq"], full[2:3] * 2)
    optimizer.load_state_dict(state)  # and torch accepts it for the (1, 3) parameter
    assert optimizer.state[expert]["exp_avg"].shape == (1, 3)


class _StubIOPath:
    """iopath's path manager as fairseq sees it; remote paths start with a registered prefix."""

    _path_handlers = {"s3://": None}

    def __init__(self):
        self.copies = []

    def copy(self, src_path, dst_path, overwrite=False):
        self.copies.append((src_path, dst_path))
        return True


def test_copy_to_checkpoint_last_is_atomic_also_when_iopath_is_installed(tmp_path, monkeypatch):
    iopath = _StubIOPath()
    monkeypatch.setattr(file_io, "IOPathManager", iopath)
    src, dst = tmp_path / "checkpoint_1_5.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(b"new checkpoint")
    dst.write_bytes(b"previous good checkpoint")

    def copy_that_dies_midway(source, target):
        with open(target, "wb") as handle:
            handle.write(b"new chec")
        raise KeyboardInterrupt("killed during the copy")

    monkeypatch.setattr(expert_checkpoint.shutil, "copyfile", copy_that_dies_midway)
    with pytest.raises(KeyboardInterrupt):
        file_io.PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"previous good checkpoint"

    monkeypatch.undo()
    monkeypatch.setattr(file_io, "IOPathManager", iopath)
    assert file_io.PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"new checkpoint" and iopath.copies == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1_5.pt", "checkpoint_last.pt"]
    file_io.PathManager.copy(str(src), "s3://bucket/checkpoint_last.pt", overwrite=True)
    assert iopath.copies == [(str(src), "s3://bucket/checkpoint_last.pt")]  # remote: iopath's own copy


def _common(**flags) -> SimpleNamespace:
    names = ("fp16", "bf16", "memory_efficient_fp16", "memory_efficient_bf16", "amp")
    return SimpleNamespace(**{name: flags.get(name, False) for name in names})


def test_which_precision_settings_build_fairseqs_flat_fp16_optimizer():
    assert uses_flat_fp16_optimizer(_common(fp16=True), is_fsdp=False)
    assert uses_flat_fp16_optimizer(_common(bf16=True), is_fsdp=False)
    assert not uses_flat_fp16_optimizer(_common(), is_fsdp=False)
    assert not uses_flat_fp16_optimizer(_common(fp16=True, memory_efficient_fp16=True), is_fsdp=False)
    assert not uses_flat_fp16_optimizer(_common(bf16=True, memory_efficient_bf16=True), is_fsdp=False)
    assert not uses_flat_fp16_optimizer(_common(fp16=True, amp=True), is_fsdp=False)
    assert not uses_flat_fp16_optimizer(_common(fp16=True), is_fsdp=True)


def test_optimizer_build_refuses_plain_fp16_when_parameters_freeze_mid_training():
    model = nn.Linear(2, 2)
    keep_in_optimizer([model.weight])
    trainer = SimpleNamespace(model=model, criterion=nn.Module(), cfg=SimpleNamespace(common=_common(fp16=True)),
                              is_fsdp=False)
    with pytest.raises(ValueError, match="--memory-efficient-fp16"):
        Trainer._build_optimizer(trainer)
