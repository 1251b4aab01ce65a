#!/usr/bin/env python
"""A fairseq-train worker (scripts/fairseq_train_torchrun.py) that records what it resumed from.

    torchrun --nproc-per-node W tests/lifecycle/record_loaded_state.py OUT_DIR <fairseq-train args>

Right after fairseq has loaded the checkpoint (checkpoint_utils.load_checkpoint, before the first
update), every rank saves to OUT_DIR/rank{R}.pt its model state (its own slice of the experts),
the optimizer state of every parameter by name, and which experts it holds. Training then goes
on unchanged. The elastic-resume test compares these with the checkpoint file, exactly.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def record(trainer, out_dir: Path) -> None:
    from xmoe.moe import MoELayer

    model = trainer.get_model()
    torch_optimizer = trainer.optimizer.optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer_state = {
        names[id(p)]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in torch_optimizer.state[p].items()}
        for group in torch_optimizer.param_groups
        for p in group["params"]
        if id(p) in names and p in torch_optimizer.state
    }
    layout = {
        name: (layer.first_local_expert, layer.num_local_experts, layer.num_experts)
        for name, layer in model.named_modules()
        if isinstance(layer, MoELayer)
    }
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    state = {
        "rank": rank,
        "world": world,
        "num_updates": trainer.get_num_updates(),
        "layout": layout,
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer_state,
        # torch numbers optimizer state by position: the names in that order
        "param_order": [names[id(p)] for group in torch_optimizer.param_groups for p in group["params"]],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state, out_dir / f"rank{rank}.pt")


def run_torchrun_worker(fairseq_args: list) -> None:
    """Run scripts/fairseq_train_torchrun.py with these fairseq-train arguments, in this process
    (so that patches made before the call apply)."""
    wrapper_path = Path(__file__).resolve().parents[2] / "scripts" / "fairseq_train_torchrun.py"
    spec = importlib.util.spec_from_file_location("fairseq_train_torchrun", wrapper_path)
    wrapper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wrapper)
    sys.argv = [str(wrapper_path)] + list(fairseq_args)
    wrapper.main()


def main() -> None:
    out_dir = Path(sys.argv[1])
    import fairseq_cli.train  # noqa: F401  (first: it sets fairseq's log format, which the tests parse)
    from fairseq import checkpoint_utils

    load_checkpoint = checkpoint_utils.load_checkpoint

    def load_and_record(cfg, trainer, **kwargs):
        loaded = load_checkpoint(cfg, trainer, **kwargs)
        record(trainer, out_dir)
        return loaded

    checkpoint_utils.load_checkpoint = load_and_record  # fairseq_cli.train looks it up at call time
    run_torchrun_worker(sys.argv[2:])


if __name__ == "__main__":
    main()
