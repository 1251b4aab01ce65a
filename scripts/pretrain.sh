#!/usr/bin/env bash
# Pre-train an X-MoE encoder on one node (or, through scripts/launch_slurm.sh, on each node of a
# multi-node job): fairseq-hydra-train with the configs in configs/pretrain, one process per GPU
# through torchrun, or N CPU processes over gloo.
#
#   scripts/pretrain.sh [options] [Hydra overrides ...]
#
#   scripts/pretrain.sh --cpu --config tiny_cpu task.data=DATA                 # CPU, 1 process
#   scripts/pretrain.sh --cpu --nproc 2 --config tiny_cpu task.data=DATA model.moe_expert_parallel=true
#   scripts/pretrain.sh task.data=DATA model=base_paper                         # 1 GPU
#   scripts/pretrain.sh --nproc 8 task.data=DATA 'optimization.update_freq=[4]' # 8 GPUs
#
# Options:
#   --nproc N               worker processes on this node: GPUs, or CPU processes with --cpu (1)
#   --cpu                   train on CPU (distributed=cpu: gloo + legacy_ddp); default: GPUs
#   --config NAME           primary config in configs/pretrain (pretrain; tiny_cpu for a demo)
#   --work-dir DIR          checkpoints/, tensorboard/, train.log and hydra/ go here
#                           (work-dirs/<config>); running again with the same DIR resumes
#   --nnodes N              nodes of a multi-node job (1); with it:
#   --rdzv-endpoint H:P     torchrun rendezvous on host H, port P (the same on every node;
#                           without it, one node uses a private one: --standalone)
#   --rdzv-id ID            rendezvous id shared by the nodes of one job (xmoe)
#   --dry-run               print the command and exit
#   -h, --help              this text
# Every other argument goes to fairseq-hydra-train unchanged, after the ones this script adds,
# so it wins: key=value, group=option (model=, task=, gate=, optimization=, distributed=),
# hydra.* settings. The distributed group follows --cpu/--nproc unless given.
#
# Resuming: fairseq continues from <save dir>/checkpoint_last.pt when it exists, so re-running
# the same command resumes, also on another number of workers (experts are redistributed).
# The script prints the exact command it runs and exits non-zero, with a message, on failure.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(realpath -m "${XMOE_VENV:-$REPO_ROOT/.venv}")"

die() { echo "pretrain.sh: error: $*" >&2; exit 2; }
say() { echo "[pretrain.sh] $*" >&2; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

nproc=1 cpu=0 config=pretrain work_dir="" nnodes=1 rdzv_endpoint="" rdzv_id=xmoe dry_run=0
overrides=()
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nproc) need_value "$@"; nproc="$2"; shift 2 ;;
        --cpu) cpu=1; shift ;;
        --config) need_value "$@"; config="$2"; shift 2 ;;
        --work-dir) need_value "$@"; work_dir="$2"; shift 2 ;;
        --nnodes) need_value "$@"; nnodes="$2"; shift 2 ;;
        --rdzv-endpoint) need_value "$@"; rdzv_endpoint="$2"; shift 2 ;;
        --rdzv-id) need_value "$@"; rdzv_id="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; overrides+=("$@"); break ;;
        --*) die "unknown option $1 (Hydra overrides are key=value; see --help)" ;;
        *) overrides+=("$1"); shift ;;
    esac
done

[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer, got '$nproc'"
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || die "--nnodes must be a positive integer, got '$nnodes'"
if (( nnodes > 1 )) && [[ -z "$rdzv_endpoint" ]]; then
    die "--nnodes $nnodes needs --rdzv-endpoint HOST:PORT (the same on every node)"
fi
config_dir="$REPO_ROOT/configs/pretrain"
[[ -f "$config_dir/$config.yaml" ]] || die "no config '$config' in $config_dir ($(cd "$config_dir" && ls -- *.yaml | sed 's/\.yaml$//' | tr '\n' ' '))"

# The value the user gives to a Hydra key (last one wins, as in Hydra), or nothing.
user_value() {
    local key="$1" arg value=""
    for arg in "${overrides[@]+"${overrides[@]}"}"; do
        arg="${arg#++}"; arg="${arg#+}"
        [[ "$arg" == "$key="* ]] && value="${arg#"$key="}"
    done
    printf '%s' "$value"
}

work_dir="$(realpath -m "${work_dir:-work-dirs/$config}")"
save_dir="$(user_value checkpoint.save_dir)"
save_dir="$(realpath -m "${save_dir:-$work_dir/checkpoints}")"
data="$(user_value task.data)"
if [[ -n "$data" && ! -d "$data" && $dry_run -eq 0 ]]; then
    die "task.data=$data is not a folder"
fi

world=$((nproc * nnodes))
if [[ -n "$(user_value distributed)" ]]; then
    distributed=()  # the user's choice
elif (( cpu )); then
    distributed=(distributed=cpu)
elif (( world > 1 )); then
    distributed=(distributed=multi_gpu)
else
    distributed=(distributed=single_gpu)
fi

for tool in fairseq-hydra-train torchrun; do
    [[ -x "$VENV/bin/$tool" ]] || die "$VENV/bin/$tool not found: run scripts/install.sh (or set XMOE_VENV)"
done
if (( ! cpu && ! dry_run )); then
    gpus="$("$VENV/bin/python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
    (( gpus >= nproc )) || die "--nproc $nproc needs $nproc GPUs, $gpus visible on $(hostname) (--cpu trains on CPU)"
fi

train_args=(
    --config-dir "$config_dir" --config-name "$config"
    "common.user_dir=$REPO_ROOT/xmoe"
    "checkpoint.save_dir=$save_dir"
    "common.tensorboard_logdir=$work_dir/tensorboard"
    "common.log_file=$work_dir/train.log"
    "hydra.run.dir=$work_dir/hydra/$(date +%Y-%m-%d_%H-%M-%S)"
    "${distributed[@]+"${distributed[@]}"}"
    "${overrides[@]+"${overrides[@]}"}"
)
if (( world == 1 )); then
    cmd=("$VENV/bin/fairseq-hydra-train" "${train_args[@]}")
else
    if (( nnodes == 1 )) && [[ -z "$rdzv_endpoint" ]]; then
        launcher=(--standalone)
    else
        launcher=(--nnodes "$nnodes" --rdzv-backend c10d --rdzv-endpoint "$rdzv_endpoint" --rdzv-id "$rdzv_id")
    fi
    cmd=("$VENV/bin/torchrun" "${launcher[@]}" --nproc-per-node "$nproc"
         "$REPO_ROOT/scripts/fairseq_train_torchrun.py" --hydra "${train_args[@]}")
fi

if [[ -f "$save_dir/checkpoint_last.pt" ]]; then
    say "resuming from $save_dir/checkpoint_last.pt on $world worker(s)"
else
    say "new run: checkpoints go to $save_dir"
fi
printf '%q ' "${cmd[@]}"; echo
(( dry_run )) && exit 0

mkdir -p "$work_dir"
status=0
"${cmd[@]}" || status=$?
if (( status != 0 )); then
    echo "pretrain.sh: training failed with exit code $status (log: $work_dir/train.log)" >&2
    exit "$status"
fi
say "done: checkpoints in $save_dir, tensorboard logs in $work_dir/tensorboard"
