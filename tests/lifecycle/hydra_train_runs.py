#!/usr/bin/env python
"""Several fairseq-hydra-train runs one after the other in one process.

    python tests/lifecycle/hydra_train_runs.py RUNS.json

RUNS.json is a list of fairseq-hydra-train argument lists, as scripts/pretrain.sh --dry-run
prints them (without the program): ["--config-dir", DIR, "--config-name", NAME, "key=value", ...].
Each run composes its config the way fairseq-hydra-train does (fairseq's schema stored under the
config name, then the yaml and the overrides) and trains through fairseq's own Hydra entry point;
its output follows a line "==> run I". The runs share one interpreter start and one import of
fairseq, which on 2 cores cost more than a short run of the tiny model.
"""

from __future__ import annotations

import json
import sys


def split_args(args: list[str]) -> tuple[str, str, list[str]]:
    """(config dir, config name, overrides) of a fairseq-hydra-train argument list. Overrides of
    Hydra's own settings (hydra.*: its output folder) are dropped: compose() has no job to run."""
    config_dir, config_name, overrides = None, None, []
    rest = iter(args)
    for arg in rest:
        if arg == "--config-dir":
            config_dir = next(rest)
        elif arg == "--config-name":
            config_name = next(rest)
        elif not arg.startswith("hydra."):
            overrides.append(arg)
    if config_dir is None or config_name is None:
        raise SystemExit(f"hydra_train_runs.py: --config-dir and --config-name are needed in {args}")
    return config_dir, config_name, overrides


def train(args: list[str]) -> None:
    from fairseq.dataclass.initialize import hydra_init
    from fairseq_cli.hydra_train import _hydra_main
    from hydra import compose, initialize_config_dir

    config_dir, config_name, overrides = split_args(args)
    hydra_init(config_name)
    with initialize_config_dir(config_dir=config_dir, version_base="1.1"):
        cfg = compose(config_name=config_name, overrides=overrides)
    _hydra_main(cfg)


def main() -> None:
    import fairseq_cli.train  # noqa: F401  (first: it sets fairseq's log format, which the tests parse)

    with open(sys.argv[1]) as f:
        runs = json.load(f)
    for index, args in enumerate(runs):
        print(f"==> run {index}", flush=True)
        train(args)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
