#!/usr/bin/env python
"""Run fairseq-train (or fairseq-hydra-train) as one worker of a torchrun job, on GPU or CPU.

    torchrun --nproc_per_node 2 scripts/fairseq_train_torchrun.py DATA --user-dir xmoe --cpu ...
    torchrun --nproc_per_node 8 scripts/fairseq_train_torchrun.py --hydra \\
        --config-dir configs/pretrain --config-name pretrain task.data=DATA ...

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR/PORT); this wrapper turns them
into fairseq's distributed options, so that fairseq joins torchrun's process group instead of
spawning its own workers. Without it, plain torchrun trains independent copies into one folder,
and `--distributed-world-size N --cpu` refuses to start for lack of GPUs.

fairseq-train: with --cpu it also picks what works there: the gloo backend and legacy_ddp
(pytorch_ddp and c10d need device ids; legacy_ddp also honours `param.expert`, skipping the
all-reduce of expert-parallel parameters). Options given explicitly on the command line win.

--hydra: the remaining arguments go to fairseq-hydra-train, and the distributed settings are
appended as Hydra overrides (backend and DDP flavour come from the config: the `distributed`
group of configs/pretrain). Only rank 0 writes Hydra's copy of the resolved config.
"""

import os
import sys


def _require_torchrun(env: dict[str, str]) -> None:
    missing = [k for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE") if k not in env]
    if missing:
        raise SystemExit(f"{missing} not set: launch this script with torchrun")


def distributed_args(argv: list[str], env: dict[str, str]) -> list[str]:
    """The fairseq-train options to append to argv for the torchrun worker described by env."""
    _require_torchrun(env)

    def given(option: str) -> bool:
        return any(a == option or a.startswith(option + "=") for a in argv)

    extra = [
        "--distributed-world-size", env["WORLD_SIZE"],
        "--distributed-rank", env["RANK"],
        "--distributed-init-method", "env://",
        "--distributed-no-spawn",
    ]
    if "--cpu" in argv:
        defaults = {"--distributed-backend": "gloo", "--ddp-backend": "legacy_ddp"}
    else:
        defaults = {"--device-id": env["LOCAL_RANK"]}
    for option, value in defaults.items():
        if not given(option):
            extra += [option, value]
    return extra


def hydra_overrides(argv: list[str], env: dict[str, str]) -> list[str]:
    """The Hydra overrides to append to fairseq-hydra-train's argv for this torchrun worker."""
    _require_torchrun(env)
    overrides = [
        f"distributed_training.distributed_world_size={env['WORLD_SIZE']}",
        f"distributed_training.distributed_rank={env['RANK']}",
        "distributed_training.distributed_init_method=env://",
        "distributed_training.distributed_no_spawn=true",
        f"distributed_training.device_id={env['LOCAL_RANK']}",  # ignored on CPU
    ]
    if env["RANK"] != "0" and not any(a.startswith("hydra.output_subdir=") for a in argv):
        overrides.append("hydra.output_subdir=null")  # one copy of the resolved config, not N racing ones
    return overrides


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--hydra"]:
        argv = argv[1:]
        sys.argv = ["fairseq-hydra-train"] + argv + hydra_overrides(argv, dict(os.environ))
        from fairseq_cli.hydra_train import cli_main
    else:
        sys.argv = [sys.argv[0]] + argv + distributed_args(argv, dict(os.environ))
        from fairseq_cli.train import cli_main
    cli_main()


if __name__ == "__main__":
    main()
