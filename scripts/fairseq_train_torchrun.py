#!/usr/bin/env python
"""Run fairseq-train as one worker of a torchrun job (the way that works on CPU too).

    torchrun --nproc_per_node 2 scripts/fairseq_train_torchrun.py DATA --user-dir xmoe --cpu ...

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR/PORT); this wrapper turns them
into fairseq's distributed options, so that fairseq joins torchrun's process group instead of
spawning its own workers. Without it, plain torchrun trains independent copies into one folder,
and `--distributed-world-size N --cpu` refuses to start for lack of GPUs.

With --cpu it also picks what works there: the gloo backend and legacy_ddp (pytorch_ddp and
c10d need device ids; legacy_ddp also honours `param.expert`, skipping the all-reduce of
expert-parallel parameters). Options given explicitly on the command line win.
"""

import os
import sys


def distributed_args(argv: list[str], env: dict[str, str]) -> list[str]:
    """The fairseq options to append to argv for the torchrun worker described by env."""
    missing = [k for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE") if k not in env]
    if missing:
        raise SystemExit(f"{missing} not set: launch this script with torchrun")

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


def main() -> None:
    argv = sys.argv[1:]
    sys.argv = [sys.argv[0]] + argv + distributed_args(argv, dict(os.environ))
    from fairseq_cli.train import cli_main

    cli_main()


if __name__ == "__main__":
    main()
