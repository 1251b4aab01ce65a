#!/usr/bin/env bash
# The main job: install what is missing, then pre-train an X-MoE encoder with fairseq and
# resume it from its checkpoint.
#
# For now: a tiny X-MoE encoder (xmoe_tiny) on a synthetic toy corpus, on CPU, in two legs
# (train to MAX_UPDATE/2, then a second fairseq-train run that resumes from checkpoint_last.pt
# and goes on to MAX_UPDATE). The real multilingual corpus replaces the toy one once data
# preparation lands.
#
#   scripts/main_job.sh                       # everything under work-dirs/main_job/
#   XMOE_WORK_DIR=/tmp/run MAX_UPDATE=400 scripts/main_job.sh
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(realpath -m "${XMOE_VENV:-$REPO_ROOT/.venv}")"
WORK_DIR="$(realpath -m "${XMOE_WORK_DIR:-$REPO_ROOT/work-dirs/main_job}")"
MAX_UPDATE="${MAX_UPDATE:-200}"

say() { echo "[main_job] $*"; }

"$REPO_ROOT/scripts/install.sh"
PY="$VENV/bin/python"
mkdir -p "$WORK_DIR"
cd "$REPO_ROOT"

DATA="$WORK_DIR/data"
if [[ ! -f "$DATA/dict.txt" ]]; then
    say "generating the toy corpus in $DATA"
    "$PY" scripts/make_toy_data.py "$DATA"
fi

train() {  # $1 = --max-update of this leg
    "$VENV/bin/fairseq-hydra-train" --config-dir configs/pretrain --config-name tiny_cpu \
        "task.data=$DATA" "checkpoint.save_dir=$WORK_DIR/checkpoints" \
        "common.user_dir=$REPO_ROOT/xmoe" "common.tensorboard_logdir=$WORK_DIR/tensorboard" \
        "common.log_file=$WORK_DIR/train.log" "optimization.max_update=$1" \
        "hydra.run.dir=$WORK_DIR/hydra/to_update_$1" \
        "lr_scheduler.total_num_update=$MAX_UPDATE"
}

say "leg 1: train xmoe_tiny to update $((MAX_UPDATE / 2))"
train $((MAX_UPDATE / 2))
say "leg 2: resume from $WORK_DIR/checkpoints/checkpoint_last.pt and train to update $MAX_UPDATE"
train "$MAX_UPDATE"

"$PY" - "$WORK_DIR/checkpoints/checkpoint_last.pt" <<'PYEOF'
import sys
import torch
import xmoe.checkpoint

xmoe.checkpoint.allow_fairseq_checkpoint_globals()
state = torch.load(sys.argv[1], map_location="cpu")  # weights_only loading, torch's default
print(f"[main_job] {sys.argv[1]}: update {state['optimizer_history'][-1]['num_updates']}")
PYEOF
say "done: logs in $WORK_DIR/train.log, tensorboard in $WORK_DIR/tensorboard"
