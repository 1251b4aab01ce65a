"""Frozen routing: --moe-freeze-router-after K (pre-training) and --moe-freeze-router /
--moe-freeze-experts (fine-tuning)."""

from __future__ import annotations

import re

import fairseq  # noqa: F401  (xmoe registers its fairseq components only once fairseq is loaded)
import pytest
import torch

import xmoe.models  # noqa: F401
from xmoe.expert_checkpoint import KEEP_IN_OPTIMIZER
from xmoe.moe import MoELayer
from xmoe.models.xmoe_encoder import XMoEEncoderConfig, XMoEEncoderModel, apply_architecture

from .lifecycle_helpers import load, num_updates, router_keys, set_option


def build_model(task, **options) -> XMoEEncoderModel:
    cfg = XMoEEncoderConfig(**options)
    apply_architecture(cfg, "xmoe_tiny")
    return XMoEEncoderModel.build_model(cfg, task)


def _experts(model) -> list[torch.nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, MoELayer) for p in m.experts.parameters()]


def test_router_freezes_at_update_k_and_stays_in_the_optimizer(task):
    model = build_model(task, moe_freeze_router_after=4)
    routers = model.router_parameters()
    assert len(routers) == 2 * 3  # W, expert embeddings, tau in each of the 2 MoE layers
    assert all(getattr(p, KEEP_IN_OPTIMIZER, False) for p in routers)
    model.set_num_updates(3)  # before the 4th update: still training
    assert all(p.requires_grad for p in routers)
    model.set_num_updates(4)  # from the 5th update on: frozen
    assert not any(p.requires_grad for p in routers)
    router_ids = {id(p) for p in routers}
    assert all(p.requires_grad for p in model.parameters() if id(p) not in router_ids)
    model.set_num_updates(9)  # and it stays so
    assert not any(p.requires_grad for p in routers)


def test_resumed_model_past_k_starts_frozen(task):
    model = build_model(task, moe_freeze_router_after=4)
    model.set_num_updates(10)  # what fairseq calls when it loads a checkpoint written at update 10
    assert not any(p.requires_grad for p in model.router_parameters())


def test_fine_tuning_options_freeze_router_and_experts_from_the_start(task):
    both = build_model(task, moe_freeze_router=True, moe_freeze_experts=True)
    frozen = {id(p) for p in both.router_parameters() + _experts(both)}
    assert all(not p.requires_grad for p in both.router_parameters() + _experts(both))
    assert all(p.requires_grad for p in both.parameters() if id(p) not in frozen)
    # frozen for good: not parameters that an optimizer must keep for later
    assert not any(getattr(p, KEEP_IN_OPTIMIZER, False) for p in both.parameters())

    router_only = build_model(task, moe_freeze_router=True)
    assert all(p.requires_grad for p in _experts(router_only))
    assert not any(p.requires_grad for p in router_only.router_parameters())


def test_no_freezing_by_default(task):
    model = build_model(task)
    model.set_num_updates(10**6)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_router_is_bit_identical_after_update_k_while_the_rest_trains_also_across_resume(cli, toy_data, tmp_path):
    save_dir = tmp_path / "ckpt"
    args = cli.train_args(toy_data, save_dir, max_update=8)
    args = set_option(args, "--save-interval-updates", 2)
    args = set_option(args, "--log-interval", 1)
    args += ["--moe-freeze-router-after", "4"]
    first = cli.run([cli.bin / "fairseq-train", *args], timeout=240, log_file=tmp_path / "first.log")
    cli.ok(first)
    assert "update 4: froze 6 router parameters of 2 MoE layers" in first.output
    # Resuming past K: the model freezes while the checkpoint loads, before fairseq rebuilds its
    # optimizer, which must still list the router (or the saved optimizer state no longer fits).
    second = cli.run([cli.bin / "fairseq-train", *set_option(args, "--max-update", 12)], timeout=240,
                     log_file=tmp_path / "second.log")
    cli.ok(second)
    assert re.search(r"Loaded checkpoint \S+ \(epoch \d+ @ 8 updates\)", second.output)
    assert "update 8: froze 6 router parameters" in second.output

    states = {u: load(save_dir / f"checkpoint_1_{u}.pt") for u in (2, 4, 6, 8, 10, 12)}
    assert [num_updates(s) for s in states.values()] == [2, 4, 6, 8, 10, 12]
    routers = router_keys(states[4]["model"])
    assert len(routers) == 6
    for key in routers:
        assert not torch.equal(states[2]["model"][key], states[4]["model"][key]), f"{key} did not train before K"
        for later in (6, 8, 10, 12):
            assert torch.equal(states[4]["model"][key], states[later]["model"][key]), f"{key} moved at {later}"
    others = [k for k in states[4]["model"] if k not in routers]
    unchanged = [k for k in others if torch.equal(states[4]["model"][k], states[12]["model"][k])]
    assert unchanged == [], unchanged
    # The router stayed in the optimizer (same state layout), its Adam moments untouched.
    optimizer_4, optimizer_12 = states[4]["last_optimizer_state"], states[12]["last_optimizer_state"]
    assert optimizer_4["state"].keys() == optimizer_12["state"].keys()
    frozen_moments = [i for i, s in optimizer_4["state"].items() if torch.equal(s["exp_avg"], optimizer_12["state"][i]["exp_avg"])]
    assert len(frozen_moments) == 6
