"""`xmoe-analyze`: the X-MoE paper's routing and representation analyses, and cross-lingual
retrieval, on trained xmoe_encoder checkpoints. Every subcommand writes JSON (and PNG plots)
into --out and prints its progress on stderr; docs/analysis.md gives the formulas.

    xmoe-analyze rf CKPT1 CKPT2 [...] --data DATA --out DIR     routing fluctuation
    xmoe-analyze rc CKPT [...] --data DATA --out DIR            representation collapse
    xmoe-analyze load CKPT --data DATA --out DIR                expert load per language / pair
    xmoe-analyze consistency RUN RUN [...] [--data DATA] --out DIR
                                                                inter-run consistency of loads
    xmoe-analyze retrieval CKPT --data DATA --out DIR           retrieval accuracy per pair (+ baselines)
    xmoe-analyze transfer MODEL --topic-data DIR --out DIR      zero-shot topic accuracy per language
                                                                (+ baselines)

Bad inputs (missing files, a checkpoint that is not an xmoe_encoder or has no MoE layer, a
dictionary that does not match) end with a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from xmoe.analysis.baselines import CENTRINGS, DEFAULT_CENTRING, DEFAULT_RANDOM_INIT_SEED, RETRIEVAL_BASELINES
from xmoe.analysis.corpus import AnalysisInputError, BinarizedCorpus, TokenSample, build_token_sample
from xmoe.analysis.metrics import (
    expert_counts,
    inter_run_consistency,
    normalize_counts,
    representation_collapse,
    routing_changes,
)
from xmoe.analysis.probe import (
    AnalysedCheckpoint,
    RoutingProbe,
    check_matches_corpus,
    check_same_routing_setup,
    choose_device,
    default_tokens_per_sample,
    load_checkpoint_for_analysis,
    probe_routing,
    set_eval_capacity_factor,
)
from xmoe.analysis.transfer import FREEZE_FLAGS, METHODS, TRANSFER_BASELINES, TransferSettings

PROGRAM = "xmoe-analyze"
DEFAULT_TOKENS_PER_GROUP = 4096
DEFAULT_BATCH_TOKENS = 8192


def say(message: str) -> None:
    """Progress goes to stderr, so that stdout carries only results (the retrieval table)."""
    print(f"[{PROGRAM}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def json_ready(value: Any) -> Any:
    """numpy scalars/arrays to Python, NaN/inf to null (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(out_dir: Path, name: str, payload: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(json.dumps(json_ready(payload), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    say(f"wrote {path}")
    return path


def plot_or_skip(draw: Callable[[], Path]) -> Optional[Path]:
    """Run a plotting call; without matplotlib (the optional `plot` extra) say so and go on."""
    try:
        path = draw()
    except ImportError as error:
        say(f"no plot: {error}")
        return None
    say(f"wrote {path}")
    return path


def layer_key(layer_index: int) -> str:
    return str(layer_index)  # JSON keys: the encoder layer index (0-based) of each MoE layer


# ---------------------------------------------------------------------------------------------
# Checkpoints and the token sample, shared by the commands
# ---------------------------------------------------------------------------------------------


def require_files(paths: Sequence[str], what: str) -> None:
    """Fail before any work when a file is missing (a typo in the 5th checkpoint should not
    cost the time of the first four)."""
    for path in paths:
        if not os.path.isfile(path):
            raise AnalysisInputError(f"{what} {path} does not exist" if not os.path.exists(path)
                                     else f"{what} {path} is not a file")


def open_corpus(args: argparse.Namespace) -> BinarizedCorpus:
    if not args.data:
        raise AnalysisInputError("--data DATA is required (the binarized corpus the model was trained on)")
    return BinarizedCorpus(args.data)


def probe_each_checkpoint(
    args: argparse.Namespace,
    paths: Sequence[str],
    corpus: BinarizedCorpus,
    capture_moe_inputs: bool = False,
) -> Iterator[tuple[AnalysedCheckpoint, TokenSample, RoutingProbe]]:
    """Load the checkpoints one after the other (never all at once), check each against the
    corpus and the first, and yield (checkpoint, sample, RoutingProbe) on the same token sample."""
    require_files(paths, "checkpoint")
    device = choose_device(args.device)
    first = sample = None
    for number, path in enumerate(paths, start=1):
        checkpoint = load_checkpoint_for_analysis(path, need_moe=True)
        check_matches_corpus(checkpoint, corpus)
        if first is None:
            first = checkpoint
            tokens_per_sample = args.tokens_per_sample or default_tokens_per_sample([checkpoint])
            sample = build_token_sample(
                corpus, args.split, corpus.select_languages(args.langs, args.split),
                corpus.select_pairs(args.pairs, args.split), args.max_tokens, tokens_per_sample,
            )
            say(f"token sample: split {args.split!r}, {sample.num_tokens} tokens, "
                f"sequences of <= {tokens_per_sample}: {sample.tokens_per_group()}")
        else:
            check_same_routing_setup([first, checkpoint])
        longest = max(len(x.tokens) for x in sample.sequences)
        if longest > checkpoint.config.max_positions:
            raise AnalysisInputError(
                f"{path} has {checkpoint.config.max_positions} positions, fewer than the "
                f"{longest}-token sequences of the sample: lower --tokens-per-sample"
            )
        set_eval_capacity_factor(checkpoint.encoder, args.eval_capacity_factor)
        updates = "?" if checkpoint.num_updates is None else checkpoint.num_updates
        say(f"[{number}/{len(paths)}] {path} (update {updates}, MoE layers {checkpoint.moe_layer_indices})")
        probe = probe_routing(checkpoint, sample, args.batch_tokens, device,
                              capture_moe_inputs=capture_moe_inputs, progress=lambda m: say(f"    {m}"))
        yield checkpoint, sample, probe


def sample_description(args: argparse.Namespace, sample: TokenSample) -> dict[str, Any]:
    return {
        "data": args.data,
        "split": args.split,
        "groups": sample.group_names,
        "group_kinds": sample.group_kinds,
        "tokens_per_group": sample.tokens_per_group(),
        "num_tokens": sample.num_tokens,
        "eval_capacity_factor": args.eval_capacity_factor,
    }


def updates_axis(checkpoints: Sequence[dict[str, Any]]) -> tuple[list[float], bool]:
    """x values for plots over checkpoints: update numbers, or 0, 1, ... when any is unknown."""
    updates = [c.get("num_updates") for c in checkpoints]
    if any(u is None for u in updates):
        return list(range(len(updates))), False
    return [float(u) for u in updates], True


# ---------------------------------------------------------------------------------------------
# rf
# ---------------------------------------------------------------------------------------------


def command_rf(args: argparse.Namespace) -> dict[str, Any]:
    if len(args.checkpoints) < 2:
        raise AnalysisInputError("rf compares consecutive checkpoints: give at least two")
    corpus = open_corpus(args)
    described, routed = [], []
    for checkpoint, sample, probe in probe_each_checkpoint(args, args.checkpoints, corpus):
        described.append(checkpoint.describe())
        routed.append(probe.routed)  # per MoE layer, (N,) router choices before capacity
    layers, groups_N = probe.layer_indices, probe.groups  # the same for every checkpoint
    transitions = []
    for step in range(1, len(routed)):
        per_layer = {}
        for layer_number, layer_index in enumerate(layers):
            before, after = routed[step - 1][layer_number], routed[step][layer_number]
            changes = routing_changes(before, after)
            by_group = {
                name: routing_changes(before[groups_N == g], after[groups_N == g]).fraction
                for g, name in enumerate(sample.group_names)
            }
            per_layer[layer_key(layer_index)] = {
                "rf": changes.fraction, "changed": changes.changed, "compared": changes.compared,
                "by_group": by_group,
            }
        transitions.append({
            "from": described[step - 1], "to": described[step], "layers": per_layer,
            "mean_rf": float(np.nanmean([v["rf"] for v in per_layer.values()])),
        })
    result = {
        "command": "rf",
        "checkpoints": described,
        "moe_layers": layers,
        **sample_description(args, sample),
        "transitions": transitions,
    }
    write_json(args.out, "rf.json", result)
    from xmoe.analysis.plots import plot_metric_over_updates

    x, are_updates = updates_axis([t["to"] for t in transitions])  # each RF at its later checkpoint
    series = {f"MoE layer {i}": (x, [t["layers"][layer_key(i)]["rf"] for t in transitions]) for i in layers}
    plot_or_skip(lambda: plot_metric_over_updates(
        series, args.out / "rf.png", "routing fluctuation",
        title="routing fluctuation vs. previous checkpoint" + ("" if are_updates else " (x: checkpoint number)"),
    ))
    for t in transitions:
        values = ", ".join(f"layer {k} {v['rf']:.4f}" for k, v in t["layers"].items())
        print(f"RF {t['from']['path']} -> {t['to']['path']}: {values}")
    return result


# ---------------------------------------------------------------------------------------------
# rc
# ---------------------------------------------------------------------------------------------


def command_rc(args: argparse.Namespace) -> dict[str, Any]:
    corpus = open_corpus(args)
    described, layers, sample = [], [], None
    for checkpoint, sample, probe in probe_each_checkpoint(args, args.checkpoints, corpus, capture_moe_inputs=True):
        layers = probe.layer_indices
        per_layer = {}
        for layer_number, layer_index in enumerate(layers):
            routed_N = probe.routed[layer_number]
            started = time.perf_counter()
            rc = representation_collapse(probe.moe_inputs[layer_number], routed_N)
            probe.moe_inputs[layer_number] = None  # free the (N, C) features layer by layer
            tokens_per_expert = np.bincount(routed_N[routed_N >= 0], minlength=checkpoint.num_experts)
            per_layer[layer_key(layer_index)] = {
                "rc": rc,
                "num_tokens": int((routed_N >= 0).sum()),
                "experts_with_tokens": int((tokens_per_expert > 0).sum()),
                "tokens_per_expert": tokens_per_expert,
            }
            say(f"    layer {layer_index}: RC {rc:.4g} ({time.perf_counter() - started:.1f} s)")
        described.append({**checkpoint.describe(), "layers": per_layer})
    result = {"command": "rc", "moe_layers": layers, **sample_description(args, sample), "checkpoints": described}
    write_json(args.out, "rc.json", result)
    if len(described) >= 2:
        from xmoe.analysis.plots import plot_metric_over_updates

        x, are_updates = updates_axis(described)
        series = {f"MoE layer {i}": (x, [c["layers"][layer_key(i)]["rc"] for c in described]) for i in layers}
        plot_or_skip(lambda: plot_metric_over_updates(
            series, args.out / "rc.png", "representation collapse Tr(Sigma_W Sigma_B^+)",
            title="representation collapse" + ("" if are_updates else " (x: checkpoint number)"),
        ))
    for c in described:
        values = ", ".join(f"layer {k} {v['rc']:.4g}" for k, v in c["layers"].items())
        print(f"RC {c['path']}: {values}")
    return result


# ---------------------------------------------------------------------------------------------
# load and consistency
# ---------------------------------------------------------------------------------------------


def expert_loads(
    args: argparse.Namespace, checkpoint: AnalysedCheckpoint, sample: TokenSample, probe: RoutingProbe
) -> dict[str, Any]:
    """The `load` command's JSON payload for one probed checkpoint."""
    num_experts, num_groups = checkpoint.num_experts, len(sample.group_names)
    per_layer = {}
    for layer_number, layer_index in enumerate(probe.layer_indices):
        routed_N, kept_N = probe.routed[layer_number], probe.kept[layer_number]
        counts_GE = expert_counts(routed_N, num_experts, probe.groups, num_groups)
        routed_tokens = int((routed_N >= 0).sum())
        per_layer[layer_key(layer_index)] = {
            "load": normalize_counts(counts_GE),  # (G, E), rows sum to 1
            "counts": counts_GE,
            "overall": normalize_counts(counts_GE.sum(axis=0, keepdims=True))[0],  # (E,)
            "dropped_fraction": float(((kept_N < 0) & (routed_N >= 0)).sum() / max(routed_tokens, 1)),
        }
    return {
        "command": "load",
        "checkpoint": checkpoint.describe(),
        "num_experts": num_experts,
        "moe_layers": probe.layer_indices,
        **sample_description(args, sample),
        "layers": per_layer,
    }


def command_load(args: argparse.Namespace) -> dict[str, Any]:
    from xmoe.analysis.plots import plot_expert_load_heatmap

    (checkpoint, sample, probe), = probe_each_checkpoint(args, [args.checkpoint], open_corpus(args))
    result = expert_loads(args, checkpoint, sample, probe)
    write_json(args.out, "load.json", result)
    for key, layer in result["layers"].items():
        plot_or_skip(lambda key=key, layer=layer: plot_expert_load_heatmap(
            layer["load"], args.out / f"load_layer{key}.png", group_names=result["groups"],
            title=f"expert load, MoE layer {key} ({os.path.basename(args.checkpoint)})",
            group_label="language / pair",
        ))
        print(f"load layer {key}: overall " + " ".join(f"{v:.3f}" for v in layer["overall"]))
    return result


def read_load_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except (OSError, ValueError) as error:
        raise AnalysisInputError(f"cannot read {path}: {error}") from error
    layers = payload.get("layers") if isinstance(payload, dict) else None
    if (
        not isinstance(payload, dict)
        or payload.get("command") != "load"
        or not isinstance(layers, dict)
        or not all(isinstance(layer, dict) and {"load", "overall"} <= set(layer) for layer in layers.values())
    ):
        raise AnalysisInputError(f"{path} is not the load.json of `{PROGRAM} load`")
    return payload


def _consistency_or_reason(loads: list, what: str, notes: list[str]) -> Optional[float]:
    try:
        return inter_run_consistency(np.asarray(loads, dtype=np.float64))
    except ValueError as error:  # a constant load vector or NaN rows: undefined, say why
        notes.append(f"{what}: {error}")
        return None


def command_consistency(args: argparse.Namespace) -> dict[str, Any]:
    if len(args.runs) < 2:
        raise AnalysisInputError("consistency compares runs: give at least two load.json files or checkpoints")
    require_files(args.runs, "input")
    loads_by_run: dict[int, dict[str, Any]] = {
        number: read_load_json(path) for number, path in enumerate(args.runs) if path.endswith(".json")
    }
    checkpoint_runs = [number for number in range(len(args.runs)) if number not in loads_by_run]
    if checkpoint_runs:
        # One token sample for every checkpoint given, probed one model at a time.
        probed = probe_each_checkpoint(args, [args.runs[n] for n in checkpoint_runs], open_corpus(args))
        for number, (checkpoint, sample, probe) in zip(checkpoint_runs, probed):
            loads_by_run[number] = expert_loads(args, checkpoint, sample, probe)
            write_json(args.out, f"load_run{number}.json", loads_by_run[number])
    payloads = [loads_by_run[number] for number in range(len(args.runs))]
    first = payloads[0]
    for path, payload in zip(args.runs[1:], payloads[1:]):
        for key in ("moe_layers", "num_experts", "groups"):
            if payload.get(key) != first.get(key):
                raise AnalysisInputError(
                    f"runs are not comparable: {key} {first.get(key)} in {args.runs[0]} but "
                    f"{payload.get(key)} in {path}"
                )
    notes: list[str] = []
    per_layer = {}
    for key in first["layers"]:
        per_layer[key] = {
            "overall": _consistency_or_reason([p["layers"][key]["overall"] for p in payloads], f"layer {key} overall", notes),
            "by_group": _consistency_or_reason([p["layers"][key]["load"] for p in payloads], f"layer {key} by_group", notes),
        }
    all_layers = {
        "overall": _consistency_or_reason(
            [[p["layers"][k]["overall"] for k in first["layers"]] for p in payloads], "all layers overall", notes),
        "by_group": _consistency_or_reason(
            [[p["layers"][k]["load"] for k in first["layers"]] for p in payloads], "all layers by_group", notes),
    }
    result = {
        "command": "consistency",
        "runs": [{"source": path, "checkpoint": p.get("checkpoint")} for path, p in zip(args.runs, payloads)],
        "moe_layers": first["moe_layers"],
        "num_experts": first["num_experts"],
        "groups": first["groups"],
        "layers": per_layer,
        "all_layers": all_layers,
        "notes": notes,
    }
    write_json(args.out, "consistency.json", result)
    for key, values in per_layer.items():
        print(f"consistency layer {key}: overall {values['overall']}, by group {values['by_group']}")
    print(f"consistency all layers: overall {all_layers['overall']}, by group {all_layers['by_group']}")
    return result


# ---------------------------------------------------------------------------------------------
# retrieval
# ---------------------------------------------------------------------------------------------


def command_retrieval(args: argparse.Namespace) -> dict[str, Any]:
    from xmoe.retrieval import evaluate_retrieval, format_retrieval_table

    require_files([args.checkpoint], "checkpoint")
    corpus = open_corpus(args)
    device = choose_device(args.device)
    checkpoint = load_checkpoint_for_analysis(args.checkpoint, need_moe=False)  # dense models too
    check_matches_corpus(checkpoint, corpus)
    set_eval_capacity_factor(checkpoint.encoder, args.eval_capacity_factor)
    pairs = corpus.select_pairs(args.pairs, args.split)
    say(f"{args.checkpoint}: retrieval on {args.split!r} pairs {pairs}")
    result = evaluate_retrieval(
        checkpoint, corpus, pairs, split=args.split, layer=args.layer, max_positions=args.max_positions,
        batch_tokens=args.batch_tokens, device=device, max_sentences=args.max_sentences,
        progress=lambda m: say(f"    {m}"), centring=args.centring, baselines=args.baselines,
        random_init_seed=args.random_init_seed,
    )
    result["eval_capacity_factor"] = args.eval_capacity_factor
    write_json(args.out, "retrieval.json", result)
    print(format_retrieval_table(result))
    return result


# ---------------------------------------------------------------------------------------------
# transfer
# ---------------------------------------------------------------------------------------------


def probe_or_finetune_train_cap(cap: Optional[int], method: str) -> Optional[int]:
    """--max-train-per-class as TransferSettings takes it (None = every page): when not given, the
    fine-tuning default caps the pages (time), the probe trains on all of them (docs/analysis.md)."""
    if cap is None:
        return TransferSettings.max_train_per_class if method == "finetune" else None
    return cap or None


def command_transfer(args: argparse.Namespace) -> dict[str, Any]:
    from xmoe.analysis.transfer import evaluate_transfer, format_transfer_table

    settings = TransferSettings(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
        max_train_per_class=probe_or_finetune_train_cap(args.max_train_per_class, args.method),
        max_test_per_language=args.max_test_per_language,
        pooling=args.pooling, freeze=args.freeze, device=str(choose_device(args.device)),
        method=args.method, layer=args.layer, centring=args.centring,
    )
    result = evaluate_transfer(
        args.model, args.topic_data, str(args.out), data=args.data, seeds=args.seeds, baselines=args.baselines,
        random_init_seed=args.random_init_seed, languages=args.languages, settings=settings,
        progress=lambda m: say(f"    {m}"),
    )
    write_json(args.out, "transfer.json", result)
    print(format_transfer_table(result))
    return result


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return seeds


# ---------------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def baseline_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """--baselines: a comma-separated subset of `choices`, or 'none'."""
    def parse(text: str) -> list[str]:
        if text.strip().lower() == "none":
            return []
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown baseline(s) {', '.join(unknown) or repr(text)}: choose from {', '.join(choices)}, or none")
        return names

    return parse


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_common_options(parser: argparse.ArgumentParser, split: str, data_required: bool = True) -> None:
    parser.add_argument("--data", required=data_required, default=None,
                        help="binarized corpus folder (manifest.json + dict.txt + mono/ + para/ from "
                             "data-prep, or a fairseq-preprocess folder); its dictionary must be the model's"
                             + ("" if data_required else "; needed only when a run is given as a checkpoint"))
    parser.add_argument("--out", required=True, type=Path, help="folder for the JSON and PNG outputs (created)")
    parser.add_argument("--split", default=split, help=f"data split to read (default: {split})")
    parser.add_argument("--batch-tokens", type=positive_int, default=DEFAULT_BATCH_TOKENS,
                        help="padded tokens per forward batch, a memory bound; when dropless, results do "
                             f"not depend on it beyond float rounding (default: {DEFAULT_BATCH_TOKENS})")
    parser.add_argument("--eval-capacity-factor", type=float, default=0.0,
                        help="expert capacity factor in evaluation; <= 0 is dropless (default: 0): every token "
                             "reaches its routed expert, so no result depends on which sequences share a batch")
    parser.add_argument("--device", default="auto",
                        help="torch device, e.g. cpu, cuda, cuda:1 (default: auto = cuda when available)")


def add_sample_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--langs", default=None,
                        help="comma-separated languages to sample, e.g. en,de (default: every language with "
                             "monolingual data in the split)")
    parser.add_argument("--pairs", default=None,
                        help="comma-separated language pairs to sample as TLM pairs '<s> src </s> tgt </s>', "
                             "e.g. en-de; 'none' for no pair (default: every pair with data in the split)")
    parser.add_argument("--max-tokens", type=positive_int, default=DEFAULT_TOKENS_PER_GROUP,
                        help="tokens analysed per language and per pair: the first N tokens of the split "
                             f"(default: {DEFAULT_TOKENS_PER_GROUP})")
    parser.add_argument("--tokens-per-sample", type=positive_int, default=None,
                        help="longest input sequence, special tokens included (default: the first "
                             "checkpoint's task --tokens-per-sample, within its max positions)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Routing and representation analyses (X-MoE paper) and cross-lingual retrieval on "
                    "xmoe_encoder checkpoints. Formulas and output formats: docs/analysis.md.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rf = commands.add_parser(
        "rf", help="routing fluctuation between consecutive checkpoints",
        description="Routing fluctuation RF = share of tokens whose top-1 expert (the router's choice before "
                    "capacity) changes between consecutive checkpoints, per MoE layer, on the same tokens. "
                    "Writes rf.json and rf.png.")
    rf.add_argument("checkpoints", nargs="+", metavar="CKPT",
                    help="two or more checkpoints of one run, in training order")
    add_common_options(rf, split="valid")
    add_sample_options(rf)
    rf.set_defaults(run=command_rf)

    rc = commands.add_parser(
        "rc", help="representation collapse per MoE layer",
        description="Representation collapse RC = Tr(Sigma_W Sigma_B^+) of the MoE layer inputs grouped by "
                    "routed expert, per MoE layer. Writes rc.json (and rc.png for several checkpoints).")
    rc.add_argument("checkpoints", nargs="+", metavar="CKPT", help="one or more checkpoints, in training order")
    add_common_options(rc, split="valid")
    add_sample_options(rc)
    rc.set_defaults(run=command_rc)

    load = commands.add_parser(
        "load", help="expert load per language and per pair",
        description="Share of each language's (and each pair's) tokens routed to each expert, per MoE layer. "
                    "Writes load.json and load_layer{i}.png heatmaps.")
    load.add_argument("checkpoint", metavar="CKPT", help="the checkpoint to analyse")
    add_common_options(load, split="valid")
    add_sample_options(load)
    load.set_defaults(run=command_load)

    consistency = commands.add_parser(
        "consistency", help="inter-run consistency of expert loads",
        description="Mean pairwise Pearson correlation of the expert loads of several runs, per MoE layer. "
                    "Each run is a load.json of `xmoe-analyze load` or a checkpoint (then --data is needed "
                    "and its loads are written as load_run{k}.json). Writes consistency.json.")
    consistency.add_argument("runs", nargs="+", metavar="RUN", help="load.json files and/or checkpoints, one per run")
    add_common_options(consistency, split="valid", data_required=False)
    add_sample_options(consistency)
    consistency.set_defaults(run=command_consistency)

    retrieval = commands.add_parser(
        "retrieval", help="cross-lingual sentence retrieval accuracy per language pair",
        description="Tatoeba/BUCC-style retrieval on the held-out parallel pairs: each sentence alone as "
                    "'<s> tokens </s>', mean-pooled hidden states of one layer, cosine nearest neighbour, "
                    "accuracy in both directions per pair. Writes retrieval.json and prints a table.")
    retrieval.add_argument("checkpoint", metavar="CKPT", help="the checkpoint to evaluate (dense models too)")
    add_common_options(retrieval, split="test")
    retrieval.add_argument("--pairs", default=None,
                           help="comma-separated pairs, e.g. en-de,en-fr (default: every pair with data in the split)")
    retrieval.add_argument("--layer", type=int, default=None,
                           help="hidden states to pool: 0 = embeddings, k = output of layer k (1-based) "
                                "(default: L // 2 + 1, a middle layer, as XTREME)")
    retrieval.add_argument("--max-positions", type=positive_int, default=None,
                           help="cut sentences to this many tokens, <s> and </s> included (default: the model's)")
    retrieval.add_argument("--max-sentences", type=positive_int, default=None,
                           help="evaluate only the first N sentence pairs of each language pair (default: all)")
    retrieval.add_argument("--centring", "--centering", choices=CENTRINGS, default=DEFAULT_CENTRING,
                           help="'language': subtract from each sentence embedding the mean embedding of its "
                                "language's evaluated sentences before the cosine (removes the common and the "
                                "per-language component that dominate mean-pooled states); 'none': raw "
                                "embeddings. Applies to the model and to every baseline (default: %(default)s)")
    retrieval.add_argument("--baselines", type=baseline_list(RETRIEVAL_BASELINES), default=list(RETRIEVAL_BASELINES),
                           help="comma-separated baselines evaluated on the same sentences: random_init (the same "
                                "config at random initialisation), tfidf (TF-IDF over the same sentencepiece "
                                "pieces); 'none' for none (default: random_init,tfidf)")
    retrieval.add_argument("--random-init-seed", type=int, default=DEFAULT_RANDOM_INIT_SEED,
                           help="torch seed of the random-init baseline's weights (default: %(default)s)")
    retrieval.set_defaults(run=command_retrieval)

    defaults = TransferSettings()
    transfer = commands.add_parser(
        "transfer", help="zero-shot cross-lingual topic classification accuracy per language",
        description="Fine-tune on the English pages of the LibreOffice topic task (data-prep/build_topic_task.py) "
                    "with xmoe-finetune's recipe and report accuracy on every language's test pages, beside the "
                    "majority class, the same config at random init (fine-tuned the same way, same seeds) and "
                    "TF-IDF + logistic regression over the same pieces. With --method probe the encoders stay "
                    "frozen and a per-language centred linear probe replaces the fine-tuning. Writes "
                    "transfer.json, prints a table.")
    transfer.add_argument("model", metavar="MODEL",
                          help="an exported folder (xmoe-export) or an xmoe_encoder checkpoint (exported to "
                               "OUT/exported first)")
    transfer.add_argument("--topic-data", required=True, metavar="DIR",
                          help="the task folder of data-prep/build_topic_task.py (manifest.json + TSVs)")
    transfer.add_argument("--data", default=None,
                          help="binarized corpus whose tokenizer a checkpoint MODEL uses (default: the data "
                               "folder the checkpoint was trained on); not used for an exported folder")
    transfer.add_argument("--out", required=True, type=Path,
                          help="folder for transfer.json, the capped TSVs, the random-init export and the "
                               "fine-tuning logs (created)")
    transfer.add_argument("--seeds", type=seed_list, default=[1],
                          help="comma-separated fine-tuning seeds (head init, dropout, shuffling), the same for "
                               "the model and the random-init baseline; with --method probe the logistic "
                               "regression's random_state, which its lbfgs solver does not use (default: 1)")
    transfer.add_argument("--baselines", type=baseline_list(TRANSFER_BASELINES), default=list(TRANSFER_BASELINES),
                          help="comma-separated: majority, random_init, tfidf; 'none' for none (default: all)")
    transfer.add_argument("--random-init-seed", type=int, default=DEFAULT_RANDOM_INIT_SEED,
                          help="torch seed of the random-init baseline's weights (default: %(default)s)")
    transfer.add_argument("--languages", type=lambda text: [x.strip() for x in text.split(",") if x.strip()],
                          default=None, help="comma-separated test languages (default: every language of the task)")
    transfer.add_argument("--epochs", type=positive_int, default=defaults.epochs,
                          help="fine-tuning epochs, the best on the English dev set kept (default: %(default)s)")
    transfer.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (default: %(default)s)")
    transfer.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                          help="examples per update (default: %(default)s)")
    transfer.add_argument("--max-length", type=positive_int, default=defaults.max_length,
                          help="pieces per example, <s> and </s> included; the TF-IDF baseline reads the same "
                               "pieces (default: %(default)s)")
    transfer.add_argument("--max-train-per-class", type=non_negative_int, default=None,
                          help="English training pages per module, the first in the task's (hashed) order; 0 = "
                               f"all (default: {defaults.max_train_per_class} with --method finetune, which keeps "
                               "fine-tuning to minutes; all with --method probe, which costs seconds)")
    transfer.add_argument("--max-test-per-language", type=positive_int, default=None,
                          help="test only the first N pages of each language (default: all)")
    transfer.add_argument("--pooling", choices=("mean", "first"), default=defaults.pooling,
                          help="sentence vector for the classifier: mean over the tokens or the <s> state "
                               "(default: %(default)s)")
    transfer.add_argument("--freeze", choices=tuple(FREEZE_FLAGS), default=defaults.freeze,
                          help="experts: routers and expert FFNs frozen (xmoe-finetune's default, the paper's "
                               "setting); routing: routers only; none: train everything (default: %(default)s)")
    transfer.add_argument("--device", default="auto",
                          help="torch device, e.g. cpu, cuda (default: auto = cuda when available)")
    transfer.add_argument("--method", choices=METHODS, default=defaults.method,
                          help="finetune: fine-tune each encoder with xmoe-finetune's recipe; probe: keep it "
                               "frozen and train a logistic regression on its pooled --layer features, "
                               "centred per --centring and standardised, C picked on the English dev set "
                               "(the --epochs/--lr/--freeze options then do not apply) (default: %(default)s)")
    transfer.add_argument("--layer", type=non_negative_int, default=None,
                          help="probe only: hidden states to pool, 0 = embeddings, k = output of layer k "
                               "(default: L // 2 + 1, as retrieval)")
    transfer.add_argument("--centring", "--centering", choices=CENTRINGS, default=DEFAULT_CENTRING,
                          help="probe only: 'language' subtracts the mean feature of the English train pages "
                               "from the English train and dev pages and each test language's own mean (over "
                               "its unlabelled test pages) from that language's pages, removing the "
                               "per-language offset; 'none': raw features (default: %(default)s)")
    transfer.set_defaults(run=command_transfer)
    return parser


def quiet_library_logging() -> None:
    """Warnings and errors only. NOTE: a root handler must exist before fairseq is imported:
    some fairseq modules call logging.basicConfig(level=DEBUG) at import, which is a no-op once
    the root logger has a handler (otherwise matplotlib's debug chatter floods stderr)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.WARNING)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_library_logging()
    try:
        args.run(args)
    except AnalysisInputError as error:
        parser.exit(2, f"{PROGRAM} {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
