"""Helpers the benchmark scripts share: the peak resident set of this process, and
--compare-env, which runs the script's own measurement in child processes with and without
environment settings (allocator switches such as THP_MEM_ALLOC_ENABLE=1 are read once, at the
first tensor allocation, so they can only be compared across processes).

--compare-env "NAME=VALUE [NAME=VALUE ...]" (repeatable; each one is a variant) runs, for
--env-rounds rounds, the script once as the base (every variable named in any variant removed
from the environment) and once per variant, interleaved, the order rotated each round so no
variant always runs first. Each child prints its usual JSON line (the parent copies it to
stderr as it comes, with its round and variant); the parent then prints one JSON line:

    {"variants": {"base": {"env": {...}, "median": {...}, "min": {...}, "max": {...}}, "VARIANT": {...}},
     "vs_base": {"VARIANT": {KEY: median(VARIANT) / median(base), ...}},
     "rounds": N, "child_argv": [...], "load_average_start": [...], "load_average_end": [...]}

KEY is each numeric field of the child's JSON (nested fields joined by "."), except the ones
that are the same in every child (sizes, settings: they go to "config" once). "env" is what the
children saw of the compared variables (null: unset), from the "env" field a child adds to its
JSON (child_env).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys


def max_rss_mb() -> float:
    """Peak resident set of this process so far, in MiB."""
    # NOTE: VmHWM, not ru_maxrss: Linux carries the parent's peak into ru_maxrss across fork+exec,
    # which would hide a child's own peak.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def env_setting(text: str) -> dict[str, str]:
    """argparse type of --compare-env: "NAME=VALUE [NAME=VALUE ...]" -> {NAME: VALUE}."""
    setting = {}
    for item in text.split():
        name, sep, value = item.partition("=")
        if not sep or not name or not name.replace("_", "").isalnum():
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE [NAME=VALUE ...], got {item!r}")
        setting[name] = value
    if not setting:
        raise argparse.ArgumentTypeError("expected NAME=VALUE [NAME=VALUE ...], got nothing")
    return setting


def add_compare_env_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compare-env", type=env_setting, action="append", metavar="'NAME=VALUE ...'",
        help="run the measurement in child processes with these environment variables set and, "
             "interleaved, without them (the base); repeatable, one variant each; prints medians and "
             "variant/base ratios (e.g. --compare-env THP_MEM_ALLOC_ENABLE=1)",
    )
    parser.add_argument("--env-rounds", type=int, default=5,
                        help="with --compare-env: child runs per variant (default 5)")
    parser.add_argument("--env-child", action="store_true", help=argparse.SUPPRESS)  # a child of --compare-env


def child_env(args: argparse.Namespace) -> dict[str, str | None]:
    """In a child of --compare-env: the compared variables as this process sees them (None: unset)."""
    return {name: os.environ.get(name) for setting in args.compare_env or [] for name in setting}


def flatten(record: dict, prefix: str = "") -> dict[str, float]:
    """Numeric fields of a (nested) JSON record, keyed "outer.inner"."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def compare_env(script: str, argv: list[str], settings: list[dict[str, str]], rounds: int) -> dict:
    """Run `script argv` in child processes: the base and each setting, `rounds` times, interleaved."""
    if rounds < 1:
        sys.exit(f"{os.path.basename(script)}: --env-rounds must be positive, got {rounds}")
    compared = sorted({name for setting in settings for name in setting})
    base_env = {k: v for k, v in os.environ.items() if k not in compared}
    variants = {"base": base_env}
    for setting in settings:
        variants[" ".join(f"{k}={v}" for k, v in setting.items())] = {**base_env, **setting}
    names = list(variants)
    load_start = [round(x, 2) for x in os.getloadavg()]
    records, seen = {name: [] for name in names}, {}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            child = subprocess.run(
                [sys.executable, os.path.abspath(script), *argv, "--env-child"],
                env=variants[name], capture_output=True, text=True,
            )
            if child.returncode != 0:
                sys.exit(f"{os.path.basename(script)}: child run ({name}) failed with exit code "
                         f"{child.returncode}:\n{child.stderr.strip()}")
            line = child.stdout.strip().splitlines()[-1]
            # each child's line goes to stderr as it comes, so a run stopped early keeps what it measured
            print(json.dumps({"round": round_index + 1, "variant": name, "result": json.loads(line)}),
                  file=sys.stderr, flush=True)
            record = json.loads(line)
            seen[name] = record.get("env")
            records[name].append(flatten(record))

    every = [record for name in names for record in records[name]]
    keys = [key for key in every[0] if all(key in record for record in every)]
    varying = [key for key in keys if len({record[key] for record in every}) > 1]
    result = {"variants": {}, "vs_base": {}}
    for name in names:
        result["variants"][name] = {
            "env": seen[name],
            **{
                stat: {key: round(fn([record[key] for record in records[name]]), 4) for key in varying}
                for stat, fn in (("median", statistics.median), ("min", min), ("max", max))
            },
        }
    base_median = result["variants"]["base"]["median"]
    for name in names[1:]:
        median = result["variants"][name]["median"]
        result["vs_base"][name] = {
            key: round(median[key] / base_median[key], 3) for key in varying if base_median[key]
        }
    result.update(
        rounds=rounds,
        child_argv=argv,
        config={key: every[0][key] for key in keys if key not in varying},
        load_average_start=load_start,
        load_average_end=[round(x, 2) for x in os.getloadavg()],
    )
    return result
