#!/usr/bin/env bash
#SBATCH --job-name=xmoe-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=2-00:00:00
#SBATCH --output=xmoe-pretrain-%j.out
# Multi-node pre-training under slurm: one task per node (srun), each running scripts/pretrain.sh,
# which starts torchrun with one worker per GPU; the nodes meet at a c10d rendezvous on the
# first node of the allocation.
#
#   sbatch scripts/launch_slurm.sh task.data=DATA model=base_paper     # the #SBATCH lines above
#   sbatch --nodes 4 scripts/launch_slurm.sh task.data=DATA            # sbatch options win
#   salloc --nodes 2 --gpus-per-node 8  then  scripts/launch_slurm.sh task.data=DATA
#
# Options (everything else goes to scripts/pretrain.sh: its options, then Hydra overrides):
#   --gpus-per-node N   workers per node (default: SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE)
#   --port P            rendezvous port on the first node (29500)
#   --hosts H1,H2,...   the nodes (default: the allocation, SLURM_JOB_NODELIST)
#   --dry-run           print the srun command and the command each node runs, run nothing
#                       (works outside slurm with --hosts and --gpus-per-node)
#   -h, --help          this text
# Resuming: submit the same command again; every node resumes from checkpoint_last.pt in the
# shared work dir (pretrain.sh --work-dir, on a file system all nodes see), also with another
# number of nodes or GPUs.
set -euo pipefail

# sbatch runs a copy of this script from its spool folder: find the repository from the folder
# the job was submitted from in that case.
script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -f "$script_dir/pretrain.sh" ]]; then
    pretrain="$script_dir/pretrain.sh"
else
    pretrain="${SLURM_SUBMIT_DIR:-.}/scripts/pretrain.sh"
fi

die() { echo "launch_slurm.sh: error: $*" >&2; exit 2; }
usage() { sed -n '9,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

gpus_per_node="" port=29500 hosts="" dry_run=0
passthrough=()
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --gpus-per-node) need_value "$@"; gpus_per_node="$2"; shift 2 ;;
        --port) need_value "$@"; port="$2"; shift 2 ;;
        --hosts) need_value "$@"; hosts="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --nproc|--nnodes|--rdzv-endpoint|--rdzv-id|--cpu)
            die "$1 is set by launch_slurm.sh (one torchrun per node, one worker per GPU)" ;;
        *) passthrough+=("$1"); shift ;;
    esac
done
[[ -f "$pretrain" ]] || die "cannot find scripts/pretrain.sh (looked at $pretrain): submit from the repository root"

if [[ -n "$hosts" ]]; then
    read -r -a nodes <<< "${hosts//,/ }"
else
    [[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "not inside a slurm allocation (SLURM_JOB_NODELIST unset): use sbatch/salloc, or --hosts with --dry-run"
    command -v scontrol >/dev/null || die "scontrol not found"
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
fi
(( ${#nodes[@]} > 0 )) || die "no nodes"
nnodes=${#nodes[@]}
head_node="${nodes[0]}"

if [[ -z "$gpus_per_node" ]]; then
    gpus_per_node="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}"
    gpus_per_node="${gpus_per_node##*:}"  # "a100:8" -> "8"
fi
[[ "$gpus_per_node" =~ ^[1-9][0-9]*$ ]] || die "cannot tell the GPUs per node ('$gpus_per_node'): pass --gpus-per-node N"
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"

job_id="${SLURM_JOB_ID:-manual}"
node_cmd=(bash "$pretrain" --nnodes "$nnodes" --nproc "$gpus_per_node"
          --rdzv-endpoint "$head_node:$port" --rdzv-id "xmoe-$job_id"
          "${passthrough[@]+"${passthrough[@]}"}")
srun_cmd=(srun --nodes "$nnodes" --ntasks-per-node 1 --kill-on-bad-exit=1 "${node_cmd[@]}")

echo "[launch_slurm.sh] $nnodes node(s) x $gpus_per_node GPU(s), rendezvous at $head_node:$port" >&2
printf '%q ' "${srun_cmd[@]}"; echo
if (( dry_run )); then
    echo "[launch_slurm.sh] each node runs:" >&2
    bash "$pretrain" --dry-run --nnodes "$nnodes" --nproc "$gpus_per_node" \
        --rdzv-endpoint "$head_node:$port" --rdzv-id "xmoe-$job_id" "${passthrough[@]+"${passthrough[@]}"}"
    exit 0
fi
command -v srun >/dev/null || die "srun not found: run this inside a slurm allocation"
exec "${srun_cmd[@]}"
