#!/usr/bin/env bash
# The GPU path in one go, on a CUDA machine (meant to take under 10 minutes; not yet run on a GPU):
#   1. the GPU tests (pytest -m gpu);
#   2. the MoE layer benchmark in bf16 (MoE vs dense FFN time ratio, tokens/s);
#   3. bench_train.py on the GPU in bf16 (each MoE variant's training tokens/s vs dense);
#   4. 200 updates of xmoe_small with scripts/pretrain.sh and fairseq's memory-efficient fp16,
#      then bf16, on a generated corpus (scripts/make_toy_data.py --raw, then data-prep): the loss
#      must be finite and fall; then a resume to update 220 and an export (xmoe-export checks
#      that the exported model gives the checkpoint's features);
#   5. a model FLOPs utilisation estimate of the bf16 run.
# Prints one JSON summary on stdout (details and logs in the work dir); exits 1 when a check
# failed. Without a CUDA device it says so in one line and exits 0.
#
#   benchmarks/gpu_check.sh [--work-dir DIR]     # default work-dirs/gpu_check (replaced)
#
# Needs only what scripts/install.sh installs. MFU = tokens/s x training FLOPs per token / peak:
# FLOPs per token = 6 x (per layer 4 d^2 + 2 d f: attention projections and the one active FFN)
# x layers + 12 x layers x d x sequence length (attention scores and values), embeddings and
# the MLM head left out; the bf16 dense peak comes from the GPU's name (H100/H200 989, A100
# 312 TFLOP/s) or XMOE_PEAK_TFLOPS.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(realpath -m "${XMOE_VENV:-$REPO_ROOT/.venv}")"
PY="$VENV/bin/python"

work_dir="$REPO_ROOT/work-dirs/gpu_check"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --work-dir) [[ $# -ge 2 ]] || { echo "gpu_check.sh: error: --work-dir needs a value" >&2; exit 2; }
                    work_dir="$(realpath -m "$2")"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ -x "$PY" ]] || { echo "gpu_check.sh: error: $PY not found: run scripts/install.sh (or set XMOE_VENV)" >&2; exit 2; }

gpus="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)"
if [[ "$gpus" == 0 ]]; then
    echo "gpu_check.sh: no CUDA device visible (torch.cuda.is_available() is False): nothing measured"
    exit 0
fi

rm -rf "$work_dir"
mkdir -p "$work_dir"
cd "$REPO_ROOT"
start=$SECONDS
say() { echo "[gpu_check] $*" >&2; }
# step NAME TIMEOUT COMMAND...: runs COMMAND with its output in NAME.log, its exit code in NAME.rc.
step() {
    local name="$1" limit="$2" rc=0
    shift 2
    say "$name: $*"
    timeout "$limit" "$@" >"$work_dir/$name.log" 2>&1 || rc=$?
    echo "$rc" >"$work_dir/$name.rc"
    (( rc == 0 )) || say "$name failed (exit $rc): see $work_dir/$name.log"
}

step gpu_tests 240 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml "$work_dir/gpu_tests.xml" tests
step layer_bf16 150 "$PY" benchmarks/bench_moe_layer.py --device cuda --dtype bfloat16 --compare-grouped --compare-dropless
step bench_train_bf16 180 "$PY" benchmarks/bench_train.py --device cuda --dtype bfloat16 \
    --layers 6 --dim 512 --ffn 2048 --heads 8 --experts 32 --batch 32 --seq-len 512

data="$work_dir/data"
step data 300 bash -c "'$PY' scripts/make_toy_data.py '$work_dir/raw' --raw --train-lines 20000 &&
    '$PY' data-prep/train_spm.py --raw '$work_dir/raw' --out '$work_dir/spm' --vocab-size 36 &&
    '$PY' data-prep/binarize.py --raw '$work_dir/raw' --spm-model '$work_dir/spm/spm.model' \
        --dict '$work_dir/spm/dict.txt' --out '$data' --workers 8"

run_args=(task=mlm_tlm "task.data=$data" model=small dataset.batch_size=32 "optimization.update_freq=[1]"
          "optimization.lr=[0.0005]" lr_scheduler.warmup_updates=20 common.log_interval=10 common.log_format=json
          dataset.disable_validation=true checkpoint.save_interval_updates=100)
declare -A precision_args=(
    [fp16]="common.fp16=true common.memory_efficient_fp16=true"
    [bf16]="common.fp16=false common.memory_efficient_fp16=false common.bf16=true common.memory_efficient_bf16=true"
)
for precision in fp16 bf16; do
    read -r -a flags <<<"${precision_args[$precision]}"
    run_dir="$work_dir/pretrain_$precision"
    step "pretrain_$precision" 300 bash scripts/pretrain.sh --work-dir "$run_dir" "${run_args[@]}" "${flags[@]}" \
        optimization.max_update=200 lr_scheduler.total_num_update=200
    step "resume_$precision" 180 bash scripts/pretrain.sh --work-dir "$run_dir" "${run_args[@]}" "${flags[@]}" \
        optimization.max_update=220 lr_scheduler.total_num_update=220
    step "export_$precision" 180 "$VENV/bin/xmoe-export" "$run_dir/checkpoints/checkpoint_last.pt" \
        "$work_dir/export_$precision" --data "$data" --force
done

"$PY" - "$work_dir" "$((SECONDS - start))" <<'PYTHON'
"""Reads the steps' logs and prints the JSON summary; exit 1 when a check failed."""
import json
import math
import os
import re
import statistics
import sys
import xml.etree.ElementTree as ET

import torch

work_dir, seconds = sys.argv[1], int(sys.argv[2])
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def text(name):
    path = os.path.join(work_dir, name)
    return open(path, encoding="utf-8", errors="replace").read() if os.path.exists(path) else ""


def rc(name):
    value = text(f"{name}.rc").strip()
    return int(value) if value else None


def last_json(name):
    for line in reversed(text(f"{name}.log").splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def records(name, tag="train_inner"):
    found = []
    for line in text(f"{name}.log").splitlines():
        if (f"[{tag}][INFO] - {{" in line or f"| {tag} | {{" in line) and line.rstrip().endswith("}"):
            found.append(json.loads(line[line.index("{"):]))
    return found


checks = {}
summary = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "work_dir": work_dir}

tests = {"rc": rc("gpu_tests")}
if os.path.exists(os.path.join(work_dir, "gpu_tests.xml")):
    suite = ET.parse(os.path.join(work_dir, "gpu_tests.xml")).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
summary["gpu_tests"] = tests
checks["gpu_tests"] = tests["rc"] == 0

for name in ("layer_bf16", "bench_train_bf16"):
    summary[name] = last_json(name) or {"rc": rc(name)}
    checks[name] = rc(name) == 0
checks["data"] = rc("data") == 0

pretrain = {}
for precision in ("fp16", "bf16"):
    run = records(f"pretrain_{precision}")
    losses = [float(r["loss"]) for r in run]
    finite = bool(losses) and all(math.isfinite(v) for v in losses)
    falling = finite and len(losses) >= 4 and statistics.mean(losses[-3:]) < statistics.mean(losses[:3]) - 0.1
    resumed = records(f"resume_{precision}")
    loaded = re.search(r"Loaded checkpoint \S+ \(epoch \d+ @ (\d+) updates\)", text(f"resume_{precision}.log"))
    verified = re.search(r"max abs difference ([0-9.e+-]+)", text(f"export_{precision}.log"))
    wps = [float(r["wps"]) for r in run[1:]]  # the first interval includes start-up
    pretrain[precision] = {
        "updates": int(run[-1]["num_updates"]) if run else 0,
        "loss_first": losses[:3], "loss_last": losses[-3:], "finite": finite, "falling": falling,
        "wps_median": statistics.median(wps) if wps else None,
        "resume": {"loaded_at_update": int(loaded.group(1)) if loaded else None,
                   "updates": [int(r["num_updates"]) for r in resumed],
                   "finite": bool(resumed) and all(math.isfinite(float(r["loss"])) for r in resumed)},
        "export": {"rc": rc(f"export_{precision}"),
                   "max_abs_difference": float(verified.group(1)) if verified else None},
    }
    checks[f"pretrain_{precision}"] = (rc(f"pretrain_{precision}") == 0 and pretrain[precision]["updates"] == 200
                                       and finite and falling)
    checks[f"resume_{precision}"] = (rc(f"resume_{precision}") == 0 and pretrain[precision]["resume"]["finite"]
                                     and pretrain[precision]["resume"]["loaded_at_update"] == 200)
    checks[f"export_{precision}"] = rc(f"export_{precision}") == 0 and verified is not None
summary["pretrain"] = pretrain

# xmoe_small (configs/pretrain/model/small.yaml): 6 layers, d 512, f 2048, 512-token samples.
layers, d, f, seq = 6, 512, 2048, 512
flops_per_token = 6 * layers * (4 * d * d + 2 * d * f) + 12 * layers * d * seq
peak = os.environ.get("XMOE_PEAK_TFLOPS")
peak = float(peak) if peak else next((v for k, v in PEAK_TFLOPS.items() if k in summary["device"]), None)
wps = pretrain["bf16"]["wps_median"]
summary["mfu"] = {
    "run": "pretrain_bf16", "tokens_per_s": wps, "flops_per_token": flops_per_token, "peak_tflops": peak,
    "mfu": round(wps * flops_per_token / (peak * 1e12), 4) if wps and peak else None,
}
summary["checks"] = checks
summary["ok"] = all(checks.values())
summary["seconds"] = seconds
print(json.dumps(summary))
sys.exit(0 if summary["ok"] else 1)
PYTHON
