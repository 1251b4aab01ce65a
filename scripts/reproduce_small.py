#!/usr/bin/env python
"""Reproduce the paper's comparisons at small scale: dense vs SMoE (switch, switch_sigmoid) vs
X-MoE (softmax, sigmoid gates), same active size, same data, same updates, several seeds.

For every (model, seed) it pre-trains with fairseq-train (MLM + TLM, task xmoe_mlm_tlm) on the
recipe that learns (docs/results.md, "Why training destroyed the retrieval signal"), keeping a
checkpoint every --checkpoint-every updates, then measures on those checkpoints with the
project's own analysis code (xmoe.analysis.cli, the `xmoe-analyze` commands):
  validation perplexity per language and pair (from fairseq's validation),
  routing fluctuation between consecutive checkpoints (rf), representation collapse per MoE
  layer (rc), expert-load balance (load), cross-lingual retrieval accuracy per pair beside the
  random-init encoder and TF-IDF (retrieval), zero-shot topic accuracy per language beside the
  majority class, the random-init encoder and TF-IDF (transfer, when the topic task exists: once
  fine-tuned on English, once as a frozen, per-language centred linear probe), and training
  words (tokens) per second (fairseq's wps). Runs finished before the probe was measured get it
  added from their last checkpoint when that is still on the machine.

Each finished run's numbers go to one small JSON file in --runs-dir (docs/results_runs/ for the
study, committed with the repository), named by model, seed and a hash of every setting the run
depends on (the corpus by its content). A run whose file exists is never trained again, so the
study can be completed over several sessions and machines; the report (results.md, plots) is
always rebuilt from all the files of the requested runs and names the runs still missing.

    scripts/reproduce_small.py                       # the study (docs/results.md)
    scripts/reproduce_small.py --report-only         # rebuild the report from the committed runs
    scripts/reproduce_small.py --quick --out /tmp/q  # same code path on a toy corpus, about a minute

xmoe_upcycled (issue #14, "does upcycling pay?") is X-MoE started from the dense run of the
same seed at half its updates: the dense model at that update (its checkpoint, or the dense run
resumed from its last checkpoint before it, or trained there when it has none) is upcycled with
xmoe-upcycle and trained as xmoe for the remaining updates, continuing the dense run's data
position, with a fresh Adam and its own warm-up (10%) and linear decay. dense_restarted, its
control, continues the same dense model with the same restart but no experts.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# model name -> the fairseq options that make it (all top-1: the MoE models have the dense
# model's active size: every token runs one FFN of the same width).
MODELS = {
    "dense": ["--arch", "dense_tiny"],
    "switch": ["--arch", "xmoe_tiny", "--moe-gate", "switch"],
    "switch_sigmoid": ["--arch", "xmoe_tiny", "--moe-gate", "switch_sigmoid", "--moe-gate-fn", "sigmoid"],
    "xmoe": ["--arch", "xmoe_tiny", "--moe-gate", "xmoe", "--moe-gate-fn", "softmax"],
    "xmoe_sigmoid": ["--arch", "xmoe_tiny", "--moe-gate", "xmoe", "--moe-gate-fn", "sigmoid"],
}
# Sparse upcycling (#14): the dense run of the same seed at half its updates, upcycled by
# xmoe-upcycle (every expert a copy of its layer's dense FFN, fresh routers), trains as the
# xmoe model for the other half, on the batches the dense run would have seen next. Same
# architecture, gate and batches as xmoe: the two differ only in what the first half trained.
UPCYCLED = "xmoe_upcycled"
MODELS[UPCYCLED] = MODELS["xmoe"]
# Its control: the same restart (fresh Adam, new warm-up and decay, same batches) without the
# experts, so that what upcycling adds is told apart from what restarting the schedule does.
RESTARTED = "dense_restarted"
MODELS[RESTARTED] = MODELS["dense"]
# models started from the dense run at half way, and the models without MoE layers
FROM_HALF_WAY = (UPCYCLED, RESTARTED)
DENSE_MODELS = ("dense", RESTARTED)
# The recipe that learns (docs/results.md): no language embeddings, three TLM batches per MLM
# batch, no dropout, the MLM output bias started at the log unigram prior, width 128.
RECIPE = ["--num-languages", "0", "--dropout", "0", "--attention-dropout", "0", "--lm-bias-init", "unigram"]
# The paper's numbers (../shared/design/xmoe-paper.md): MLM validation perplexity on mC4, and
# the XTREME average, for reference beside ours.
PAPER = {
    "dense": {"mlm_ppl": 23.51, "xtreme_avg": 61.4},
    "switch": {"mlm_ppl": 19.02, "xtreme_avg": 63.8},
    "xmoe": {"mlm_ppl": 18.72, "xtreme_avg": 65.3},
    "switch_sigmoid": {"mlm_ppl": 19.59, "xtreme_avg": 64.1},
    "xmoe_sigmoid": {"mlm_ppl": 19.12, "xtreme_avg": 65.0},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="toy corpus, seed 1, 8 updates, models dense,xmoe unless --models is given, no "
                        "topic task: the same code path in about a minute (for CI)")
    parser.add_argument("--out", type=Path, default=REPO / "work-dirs" / "reproduce_small",
                        help="work folder (checkpoints and analyses of the runs trained here, results.json)")
    parser.add_argument("--runs-dir", type=Path,
                        help="one metrics JSON per finished run, reused by every later invocation (default: "
                        "docs/results_runs for the study, OUT/results_runs with --quick)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the report from the runs already in --runs-dir and list "
                        "the missing ones")
    parser.add_argument("--data", type=Path,
                        help="binarized corpus (data-prep layout); default: the LibreOffice corpus "
                        "prepared by data-prep/prepare.sh into cache/data-bin (the toy corpus with --quick)")
    parser.add_argument("--topic-data", type=Path,
                        help="zero-shot topic task (data-prep/build_topic_task.py); default: the 'topic' folder "
                        "beside --data when it has a manifest.json; 'none' = skip")
    parser.add_argument("--models", help=f"comma list among {list(MODELS)} (default: all)")
    parser.add_argument("--seeds", help="comma list of seeds (default 1,2,3; 1 with --quick)")
    parser.add_argument("--updates", type=int, default=1500, help="updates per run (default 1500)")
    parser.add_argument("--checkpoint-every", type=int, default=300,
                        help="save a checkpoint every N updates: the points of the RF / RC curves")
    parser.add_argument("--embed-dim", type=int, default=128, help="model width C (default 128)")
    parser.add_argument("--ffn-dim", type=int, default=512, help="FFN (and expert) hidden width (default 512)")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default 8)")
    parser.add_argument("--routing-dim", type=int, default=4, help="X-MoE routing dim d_e (paper: experts / 2)")
    parser.add_argument("--tokens-per-sample", type=int, default=128,
                        help="tokens per MLM block / TLM pair, <s> and </s> included (default 128)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per update (default 32)")
    parser.add_argument("--mlm-tlm-ratio", default="1:3", help="MLM:TLM batches (default 1:3)")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="peak Adam learning rate; linear warm-up over the first 10%% of the "
                        "updates, then polynomial decay to 0 (default 1e-3)")
    parser.add_argument("--analysis-tokens", type=int, default=2048,
                        help="tokens per language/pair routed by the rf/rc/load analyses")
    parser.add_argument("--results-md", type=Path,
                        help="where to write the report (default: OUT/results.md; docs/results.md for the study)")
    parser.add_argument("--extra", default="", help="extra fairseq-train arguments for every run (quoted string)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.updates, args.checkpoint_every = args.seeds or "1", 8, 4
        args.tokens_per_sample, args.batch_size, args.analysis_tokens = 64, 8, 256
        args.embed_dim, args.ffn_dim = 32, 64
        args.models = args.models or "dense,xmoe"
        args.topic_data = args.topic_data or Path("none")
    args.seeds = args.seeds or "1,2,3"
    args.runs_dir = args.runs_dir or (args.out / "results_runs" if args.quick else REPO / "docs" / "results_runs")
    args.models = args.models or ",".join(MODELS)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    seeds = args.seeds.split(",")
    if not all(seed.strip().isdigit() for seed in seeds):
        parser.error(f"--seeds: expected a comma list of whole numbers, e.g. 1,2; got '{args.seeds}'")
    if args.updates < 2 * args.checkpoint_every:
        parser.error("--updates must allow at least two checkpoints (>= 2 x --checkpoint-every)")
    return args


def say(message: str) -> None:
    print(f"[reproduce] {message}", flush=True)


def run(command: list[str], log_path: Path | None = None) -> None:
    say("$ " + " ".join(shlex.quote(c) for c in command))
    if log_path is None:
        subprocess.run(command, check=True, cwd=REPO)
        return
    with open(log_path, "w") as log:
        result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
        tail = "".join(open(log_path).readlines()[-20:])
        sys.exit(f"reproduce_small: command failed (exit {result.returncode}); last lines of {log_path}:\n{tail}")


def prepare_data(args) -> Path:
    python = sys.executable
    if args.data:
        if not (args.data / "manifest.json").is_file():
            sys.exit(f"reproduce_small: --data {args.data} has no manifest.json (run data-prep/prepare.sh)")
        return args.data
    if not args.quick:
        data = REPO / "cache" / "data-bin"
        if not (data / "manifest.json").is_file():
            run(["bash", str(REPO / "data-prep" / "prepare.sh")])
        return data
    data = args.out / "toy-data"
    if not (data / "manifest.json").is_file():
        raw, spm = args.out / "toy-raw", args.out / "toy-spm"
        run([python, "scripts/make_toy_data.py", "--raw", str(raw), "--train-lines", "600"])
        run([python, "data-prep/train_spm.py", "--raw", str(raw), "--out", str(spm), "--force",
             "--vocab-size", "32", "--sentences-per-language", "2000"])
        run([python, "data-prep/binarize.py", "--raw", str(raw), "--spm-model", str(spm / "spm.model"),
             "--dict", str(spm / "dict.txt"), "--out", str(data), "--force", "--workers", "1"])
    return data


def topic_data_of(args, data: Path) -> Path | None:
    """The zero-shot topic task to evaluate on, or None (not asked for, or not built)."""
    if args.topic_data is not None:
        if str(args.topic_data) == "none":
            return None
        if not (args.topic_data / "manifest.json").is_file():
            sys.exit(f"reproduce_small: --topic-data {args.topic_data} has no manifest.json "
                     "(build it with data-prep/build_topic_task.py)")
        return args.topic_data
    beside = data.parent / "topic"
    return beside if (beside / "manifest.json").is_file() else None


def train(args, data: Path, model: str, seed: int, run_dir: Path) -> None:
    """The study's run of `model`: args.updates updates from scratch, 10% warm-up, linear decay to 0."""
    command = train_command(args, data, model, seed, run_dir, max_update=args.updates, total_updates=args.updates,
                            warmup=max(1, args.updates // 10), save_every=args.checkpoint_every)
    run(command, run_dir / "train.log")


def train_command(args, data: Path, model: str, seed: int, run_dir: Path, max_update: int, total_updates: int,
                  warmup: int, save_every: int, more: tuple[str, ...] = ()) -> list[str]:
    """fairseq-train of `model` into run_dir/checkpoints, stopping at update `max_update` of a
    polynomial-decay schedule over `total_updates` (fairseq resumes from checkpoint_last.pt there)."""
    moe = [] if model in DENSE_MODELS else ["--moe-experts", str(args.experts), "--moe-routing-dim", str(args.routing_dim)]
    return [
        str(Path(sys.executable).parent / "fairseq-train"), str(data),
        "--user-dir", str(REPO / "xmoe"), "--task", "xmoe_mlm_tlm", "--criterion", "xmoe_masked_lm",
        *MODELS[model], *moe, *RECIPE, "--mlm-tlm-ratio", args.mlm_tlm_ratio,
        "--encoder-embed-dim", str(args.embed_dim), "--encoder-ffn-embed-dim", str(args.ffn_dim),
        "--cpu", "--seed", str(seed), "--num-workers", "0",
        "--tokens-per-sample", str(args.tokens_per_sample), "--batch-size", str(args.batch_size),
        "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", str(args.lr), "--clip-norm", "1.0",
        "--lr-scheduler", "polynomial_decay", "--warmup-updates", str(warmup),
        "--total-num-update", str(total_updates), "--max-update", str(max_update),
        "--save-dir", str(run_dir / "checkpoints"), "--save-interval-updates", str(save_every),
        "--keep-interval-updates", "-1", "--no-epoch-checkpoints",
        # NOTE: fairseq also validates at every mid-epoch save; --validate-after-updates would
        # skip those validations but also the saves themselves, which the RF / RC curves need.
        "--validate-interval-updates", str(total_updates), "--validate-interval", "1000000",
        "--data-buffer-size", "0",
        "--log-format", "json", "--log-interval", str(max(1, save_every // 2)),
        "--tensorboard-logdir", str(run_dir / "tensorboard"),
        *more, *shlex.split(args.extra),
    ]


def upcycling_plan(args) -> dict:
    """How xmoe_upcycled is made from the dense run: also part of its run settings."""
    half = args.updates // 2
    rest = args.updates - half
    return {
        "from": "dense", "at_update": half, "updates": rest, "expert_noise": 0.0,
        # A fresh Adam knows nothing of the gradients' scale (its first steps move every weight
        # by about the lr) and the routers are new: the study's own 10% warm-up, to the study's
        # peak lr, then linear decay to 0 at the study's last update.
        "warmup": max(1, rest // 10), "lr": args.lr,
        # Twice as often as the study, so that checkpoints args.checkpoint_every apart exist at
        # the study's own updates (900, 1200, 1500 for 750 + 750): RF over equal intervals.
        "save_every": max(1, args.checkpoint_every // 2),
        "data": "continues the dense run's position in the epoch",
    }


def saved_update(path: str) -> int:
    return int(re.search(r"_(\d+)\.pt$", path).group(1))


def dense_checkpoint_at(args, data: Path, seed: int, update: int, run_dir: Path) -> Path:
    """The dense model of `seed` at `update`: the dense run's checkpoint at that update, or that
    run resumed from its last checkpoint before it (fairseq's resume is exact: same batches,
    same lr schedule), or, with no usable checkpoint, trained there from scratch."""
    from xmoe.checkpoint import load_checkpoint_file

    dense_dir = args.out / "runs" / f"dense-seed{seed}"
    saved = {}
    # (only those up to `update`: later ones may still be being written by the dense run)
    for path in [p for p in checkpoints_in_order(dense_dir) if saved_update(p) <= update]:
        cfg = load_checkpoint_file(path)["cfg"]
        # only a checkpoint of the run these settings make (the folder may hold another one)
        same = (cfg["common"]["seed"] == seed and cfg["optimization"]["lr"][0] == args.lr
                and cfg["lr_scheduler"]["total_num_update"] == args.updates
                and cfg["dataset"]["batch_size"] == args.batch_size
                and cfg["task"]["tokens_per_sample"] == args.tokens_per_sample
                and cfg["model"]["encoder_embed_dim"] == args.embed_dim
                and cfg["model"]["encoder_ffn_embed_dim"] == args.ffn_dim
                and Path(cfg["task"]["data"]).resolve() == data.resolve())
        if same:
            saved[saved_update(path)] = Path(path)
        else:
            say(f"dense seed {seed}: {display_path(Path(path))} is from other settings; not used")
    if update in saved:
        say(f"dense seed {seed} at update {update}: {display_path(saved[update])}")
        return saved[update]
    half_dir = run_dir / "dense-half"
    shutil.rmtree(half_dir, ignore_errors=True)
    (half_dir / "checkpoints").mkdir(parents=True)
    earlier = [u for u in saved if u < update]
    if earlier:
        say(f"dense seed {seed}: resuming {display_path(saved[max(earlier)])} to update {update}")
        shutil.copyfile(saved[max(earlier)], half_dir / "checkpoints" / "checkpoint_last.pt")
    else:
        say(f"dense seed {seed}: no checkpoint before update {update}; training it there")
    command = train_command(args, data, "dense", seed, half_dir, max_update=update, total_updates=args.updates,
                            warmup=max(1, args.updates // 10), save_every=args.checkpoint_every)
    run(command, half_dir / "train.log")
    return half_dir / "checkpoints" / "checkpoint_last.pt"


def parse_update0(log_path: Path) -> dict:
    """The MLM losses at update 0 that xmoe-upcycle --data printed (bits per masked token)."""
    labels = {"dense": "dense model", "upcycled": "upcycled", "renormalized_dropless": "upcycled, renormalized gates, no capacity limit"}
    text = log_path.read_text()
    found = {key: re.search(rf"^  {re.escape(label)} +([0-9.]+)", text, re.M) for key, label in labels.items()}
    return {key: float(match.group(1)) for key, match in found.items() if match}


def train_from_half_way(args, data: Path, model: str, seed: int, run_dir: Path) -> dict:
    """xmoe_upcycled (or dense_restarted) of `seed` into run_dir: the dense model at half way,
    upcycled (or not), trained as xmoe (or dense) for the rest with a fresh Adam and schedule.
    Returns what the run's summary records about its start."""
    import torch

    from xmoe.checkpoint import load_checkpoint_file

    plan = upcycling_plan(args)
    dense = dense_checkpoint_at(args, data, seed, plan["at_update"], run_dir)
    restart = ("--reset-optimizer", "--reset-lr-scheduler", "--reset-meters")
    if model == RESTARTED:  # the dense checkpoint holds its data position: fairseq continues it
        command = train_command(
            args, data, model, seed, run_dir, max_update=plan["updates"], total_updates=plan["updates"],
            warmup=plan["warmup"], save_every=plan["save_every"], more=("--restore-file", str(dense), *restart))
        run(command, run_dir / "train.log")
        return {"dense_checkpoint": display_path(dense), "at_update": plan["at_update"]}
    upcycled = run_dir / "upcycled.pt"
    xmoe_options = MODELS["xmoe"][2:]  # the gate of the xmoe model (the layout is xmoe_tiny's)
    run([str(Path(sys.executable).parent / "xmoe-upcycle"), str(dense), str(upcycled), "--force",
         "--moe-experts", str(args.experts), "--moe-routing-dim", str(args.routing_dim), *xmoe_options,
         "--expert-noise", str(plan["expert_noise"]), "--seed", str(seed), "--data", str(data)],
        run_dir / "upcycle.log")
    # The data position of the dense run at that update: the second half trains on the batches
    # the dense (and the xmoe) run trained on next, so that all models see the same data.
    # (--finetune-from-model would restart the epoch and train on the first half's batches again.)
    state = load_checkpoint_file(str(upcycled))
    state["extra_state"]["train_iterator"] = load_checkpoint_file(str(dense))["extra_state"]["train_iterator"]
    torch.save(state, upcycled)
    command = train_command(
        args, data, UPCYCLED, seed, run_dir, max_update=plan["updates"], total_updates=plan["updates"],
        warmup=plan["warmup"], save_every=plan["save_every"],
        more=("--restore-file", str(upcycled), *restart))
    run(command, run_dir / "train.log")
    return {"dense_checkpoint": display_path(dense), "at_update": plan["at_update"],
            "mlm_loss_at_update0": parse_update0(run_dir / "upcycle.log")}


def parse_log(log_path: Path) -> dict:
    """fairseq's json log: the last validation record and the median training wps."""
    valid, wps = {}, []
    for line in open(log_path, encoding="utf-8", errors="replace"):
        match = re.search(r"\| (train_inner|valid) \| (\{.*\})\s*$", line)
        if not match:
            continue
        record = json.loads(match.group(2))
        if match.group(1) == "valid":
            valid = record
        elif "wps" in record:
            wps.append(float(record["wps"]))
    ppl = {k[len("valid_ppl_"):]: float(v) for k, v in valid.items() if k.startswith("valid_ppl_")}
    wps.sort()
    return {
        "valid_ppl": float(valid["valid_ppl"]) if "valid_ppl" in valid else math.nan,
        "valid_ppl_by_group": ppl,
        "wps": wps[len(wps) // 2] if wps else math.nan,
    }


def checkpoints_in_order(run_dir: Path) -> list[str]:
    paths = glob.glob(str(run_dir / "checkpoints" / "checkpoint_*_*.pt"))
    return sorted(paths, key=lambda p: int(re.search(r"_(\d+)\.pt$", p).group(1)))


def analyse(args, data: Path, topic_data: Path | None, model: str, first_seed: bool, run_dir: Path,
            rf_checkpoints: list[str] | None = None) -> dict:
    """rf_checkpoints: the checkpoints to measure routing fluctuation between (default: all)."""
    from xmoe.analysis.cli import main as analyze

    checkpoints = checkpoints_in_order(run_dir)
    last = checkpoints[-1]
    common = ["--data", str(data), "--max-tokens", str(args.analysis_tokens)]
    out = run_dir / "analysis"
    analyze(["retrieval", last, "--data", str(data), "--out", str(out / "retrieval"), "--split", "test"])
    result = {"retrieval": json.loads((out / "retrieval" / "retrieval.json").read_text())}
    if topic_data is not None:
        # The baselines do not depend on the seed of the pre-training run: fine-tune them once per model.
        baselines = [] if first_seed else ["--baselines", "none"]
        analyze(["transfer", last, "--data", str(data), "--topic-data", str(topic_data),
                 "--out", str(out / "transfer"), *baselines])
        result["transfer"] = json.loads((out / "transfer" / "transfer.json").read_text())
        result["transfer_probe"] = probe_topic(data, topic_data, last, out, first_seed)
    if model not in DENSE_MODELS:
        analyze(["rf", *(rf_checkpoints or checkpoints), *common, "--out", str(out / "rf")])
        analyze(["rc", *checkpoints, *common, "--out", str(out / "rc")])
        analyze(["load", last, *common, "--out", str(out / "load")])
        result["rf"] = json.loads((out / "rf" / "rf.json").read_text())
        result["rc"] = json.loads((out / "rc" / "rc.json").read_text())
        result["load"] = json.loads((out / "load" / "load.json").read_text())
    return result


def probe_topic(data: Path, topic_data: Path, checkpoint: str, out: Path, with_baselines: bool) -> dict:
    """Zero-shot topic accuracy of the frozen encoder: xmoe-analyze transfer --method probe (layer
    L // 2 + 1, per-language centring, all English train pages), beside the random-init encoder,
    TF-IDF and the majority class when with_baselines (they do not depend on the seed)."""
    from xmoe.analysis.cli import main as analyze

    baselines = [] if with_baselines else ["--baselines", "none"]
    analyze(["transfer", checkpoint, "--data", str(data), "--topic-data", str(topic_data), "--method", "probe",
             "--out", str(out / "transfer_probe"), *baselines])
    return json.loads((out / "transfer_probe" / "transfer.json").read_text())


def add_missing_probe(args, data: Path, topic_data: Path | None, done: Path, run: dict, run_dir: Path,
                      with_baselines: bool) -> dict:
    """A finished run measured before the topic probe was part of the study: probe its last
    checkpoint when it is still on this machine and rewrite its metrics file (same settings,
    so the same file); otherwise the run stays as it is and the report shows the probe missing."""
    checkpoints = checkpoints_in_order(run_dir)
    if topic_data is None or "topic_probe" in run or args.report_only or not checkpoints:
        return run
    say(f"{run['model']} seed {run['seed']}: adding the topic probe to {display_path(done)}")
    probe = probe_topic(data, topic_data, checkpoints[-1], run_dir / "analysis", with_baselines)
    run = {**run, **summarize_probe(probe)}
    write_run_file(done, run)
    return run


def write_run_file(done: Path, run: dict) -> None:
    """Written whole, then renamed: a file in runs_dir always means a finished run."""
    partial = done.with_suffix(".json.partial")
    partial.write_text(json.dumps(run, indent=1) + "\n")
    partial.replace(done)


def summarize_probe(probe: dict) -> dict:
    return {"topic_probe": summarize_transfer(probe), "topic_probe_layer": probe.get("layer")}


def upcycled_rf_checkpoints(args, run_dir: Path) -> list[str]:
    """xmoe_upcycled's checkpoints at the study's checkpoint updates (counted from the dense
    run's start), so that its RF is over intervals as long as the other models'; all of them
    when fewer than two fall there (--quick)."""
    checkpoints = checkpoints_in_order(run_dir)
    half = upcycling_plan(args)["at_update"]
    aligned = [path for path in checkpoints if (half + saved_update(path)) % args.checkpoint_every == 0]
    return aligned if len(aligned) >= 2 else checkpoints


def both_directions(pairs: dict) -> dict[str, float]:
    """pair -> mean of its src->tgt and tgt->src accuracies."""
    return {pair: (v["src_to_tgt"] + v["tgt_to_src"]) / 2 for pair, v in pairs.items()}


def summarize_retrieval(retrieval: dict) -> dict:
    summary = {"centring": retrieval.get("centring", "none"), "layer": retrieval.get("layer"),
               "model": both_directions(retrieval["pairs"])}
    for name, baseline in (retrieval.get("baselines") or {}).items():
        summary[name] = both_directions(baseline["pairs"])
    return summary


def summarize_transfer(transfer: dict) -> dict:
    """encoder or baseline -> {language: accuracy} (English is the in-language reference)."""
    return {name: dict(values["accuracy"]) for name, values in transfer["results"].items()}


def update_of(described: dict) -> int:
    return int(described.get("num_updates") or re.search(r"_(\d+)\.pt$", described["path"]).group(1))


def summarize_run(model: str, seed: int, log: dict, analysis: dict) -> dict:
    retrieval = analysis["retrieval"]
    summary = {
        "model": model, "seed": seed, **log,
        "retrieval_avg": sum(retrieval["average"].values()) / len(retrieval["average"]),
        "retrieval_by_pair": both_directions(retrieval["pairs"]),
        "retrieval": summarize_retrieval(retrieval),
    }
    if "transfer" in analysis:
        summary["topic"] = summarize_transfer(analysis["transfer"])
    if "transfer_probe" in analysis:
        summary.update(summarize_probe(analysis["transfer_probe"]))
    if "rf" in analysis:
        transitions = analysis["rf"]["transitions"]
        summary["rf_curve"] = [(update_of(t["to"]), t["mean_rf"]) for t in transitions]
        summary["rf_final"] = transitions[-1]["mean_rf"]
        rc_points = []
        for entry in analysis["rc"]["checkpoints"]:
            values = [v["rc"] for v in entry["layers"].values() if v.get("rc") is not None]
            rc_points.append((update_of(entry), sum(values) / len(values) if values else math.nan))
        summary["rc_curve"] = rc_points
        summary["rc_final"] = rc_points[-1][1]
        loads = [layer["overall"] for layer in analysis["load"]["layers"].values()]
        summary["load_max"] = max(max(load) * len(load) for load in loads)  # 1 = perfectly balanced
    return summary


def display_path(path: Path) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(REPO))
    except ValueError:
        return str(path)


def data_fingerprint(folder: Path | None, names: tuple[str, ...]) -> str | None:
    """A hash of a corpus's defining files, so that runs are matched by content, not by path."""
    if folder is None:
        return None
    digest = hashlib.sha256()
    for name in names:
        path = folder / name
        digest.update(name.encode() + (path.read_bytes() if path.is_file() else b"-"))
    return digest.hexdigest()[:16]


def run_settings(args, data: Path, topic_data: Path | None) -> dict:
    """What a finished run depends on: its JSON is reused only when these are unchanged."""
    keys = ("updates", "checkpoint_every", "embed_dim", "ffn_dim", "experts", "routing_dim", "tokens_per_sample",
            "batch_size", "mlm_tlm_ratio", "lr", "analysis_tokens", "extra")
    return {
        "data": data_fingerprint(data, ("manifest.json", "dict.txt")),
        "topic_data": data_fingerprint(topic_data, ("manifest.json", "en.train.tsv")),
        "recipe": " ".join(RECIPE),
        **{key: getattr(args, key) for key in keys},
    }


def model_settings(args, model: str, settings: dict) -> dict:
    """The run settings of `model`: xmoe_upcycled's also hold how it is upcycled."""
    return {**settings, "upcycle": upcycling_plan(args)} if model in FROM_HALF_WAY else settings


def run_file(runs_dir: Path, model: str, seed: int, settings: dict) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return runs_dir / f"{model}-seed{seed}-{key}.json"


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    data = prepare_data(args)
    topic_data = topic_data_of(args, data)
    study_settings = run_settings(args, data, topic_data)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs, missing = [], []
    for model in args.models.split(","):
        settings = model_settings(args, model, study_settings)
        for seed in seeds:
            done = run_file(args.runs_dir, model, seed, settings)
            previous = json.loads(done.read_text()) if done.is_file() else {}
            if previous.get("run_settings") == settings:
                say(f"{model} seed {seed}: reusing {display_path(done)}")
                run_dir = args.out / "runs" / f"{model}-seed{seed}"
                try:
                    previous = add_missing_probe(args, data, topic_data, done, previous, run_dir, seed == seeds[0])
                except (Exception, SystemExit) as error:  # the run itself stays valid
                    say(f"{model} seed {seed}: topic probe FAILED ({type(error).__name__}: {error})")
                runs.append(previous)
                continue
            if args.report_only:
                missing.append(f"{model} seed {seed}")
                continue
            run_dir = args.out / "runs" / f"{model}-seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            say(f"{model} seed {seed}: training {args.updates} updates"
                + (" (dense to half way, then restarted)" if model in FROM_HALF_WAY else ""))
            # An unfinished run starts afresh.
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            train_started = time.time()
            try:
                if model in FROM_HALF_WAY:
                    upcycled_from = train_from_half_way(args, data, model, seed, run_dir)
                    rf_checkpoints = upcycled_rf_checkpoints(args, run_dir)
                else:
                    train(args, data, model, seed, run_dir)
                    rf_checkpoints = None
                analysis_started = time.time()
                analysis = analyse(args, data, topic_data, model, seed == seeds[0], run_dir, rf_checkpoints)
            except (Exception, SystemExit) as error:  # one failed run must not stop the others
                say(f"{model} seed {seed}: FAILED ({type(error).__name__}: {error}); going on with the next run")
                missing.append(f"{model} seed {seed} (failed: {type(error).__name__})")
                continue
            summary = summarize_run(model, seed, parse_log(run_dir / "train.log"), analysis)
            if model in FROM_HALF_WAY:
                # its curves over the updates since the dense run started, like the other models'
                half = upcycled_from["at_update"]
                for curve in ("rf_curve", "rc_curve"):
                    if curve in summary:
                        summary[curve] = [(half + update, value) for update, value in summary[curve]]
                summary["upcycled_from"] = upcycled_from
            summary["seconds"] = {"train": round(analysis_started - train_started, 1),
                                  "analysis": round(time.time() - analysis_started, 1)}
            summary["run_settings"] = settings
            write_run_file(done, summary)
            say(f"{model} seed {seed}: wrote {display_path(done)}")
            runs.append(summary)

    from xmoe.analysis.report import write_reproduction_report

    threads = os.environ.get("OMP_NUM_THREADS", "default")
    hardware = f"{os.cpu_count()} CPU cores, torch threads {threads}; python {sys.version.split()[0]}"
    study = {
        "command": os.environ.get("XMOE_REPRODUCE_COMMAND")
        or " ".join(["scripts/reproduce_small.py", *(shlex.quote(a) for a in (argv or sys.argv[1:]))]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "recipe": " ".join(RECIPE), "runs_dir": display_path(args.runs_dir), "missing": missing,
        "data": display_path(data), "topic_data": display_path(topic_data) if topic_data else None,
        "hardware": hardware, "wall_seconds": round(time.time() - started, 1),
        "paper": PAPER, "runs": runs,
    }
    (args.out / "results.json").write_text(json.dumps(study, indent=1))
    report = args.results_md or args.out / "results.md"
    write_reproduction_report(study, report, plots_dir=report.parent / (report.stem + "_plots"))
    say(f"wrote {args.out / 'results.json'} and {report} in {study['wall_seconds']} s"
        + (f"; missing runs: {', '.join(missing)}" if missing else ""))
    failed = [m for m in missing if "(failed" in m]
    if failed:
        sys.exit(f"reproduce_small: {len(failed)} run(s) failed (see above): {', '.join(failed)}")


if __name__ == "__main__":
    main()
