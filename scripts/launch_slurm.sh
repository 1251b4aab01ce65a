#!/usr/bin/env bash
#SBATCH --job-name=xmoe-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=2-00:00:00
#SBATCH --output=xmoe-pretrain-%j.out
# Multi-node pre-training under slurm: one task per node (srun), each running scripts/pretrain.sh,
# which starts torchrun with one worker per GPU (or, with --cpu, N CPU workers over gloo); the
# nodes meet at a c10d rendezvous on the first node of the allocation.
#
#   sbatch scripts/launch_slurm.sh task.data=DATA model=base_paper     # the #SBATCH lines above
#   sbatch --nodes 4 scripts/launch_slurm.sh task.data=DATA            # sbatch options win
#   salloc --nodes 2 --gpus-per-node 8  then  scripts/launch_slurm.sh task.data=DATA
# On a cluster without GPUs, cancel the header's GPU request with --gpus-per-node=0 (sbatch
# otherwise refuses: "Invalid generic resource (gres) specification") and size the CPUs:
#   sbatch --gpus-per-node=0 --nodes 2 --cpus-per-task 16 scripts/launch_slurm.sh --cpu \
#       --config tiny_cpu task.data=DATA model.moe_expert_parallel=true --work-dir /shared/run
#
# Options (everything else goes to scripts/pretrain.sh: its options, then Hydra overrides):
#   --gpus-per-node N   GPU workers per node (default: SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE)
#   --cpu               train on CPUs: --procs-per-node worker processes per node, over gloo
#   --procs-per-node N  with --cpu: workers per node (default: the job's SLURM_CPUS_PER_TASK, or 1)
#   --port P            rendezvous port on the first node (default 29500 + job id mod 1000, so
#                       jobs sharing a node do not collide)
#   --hosts H1,H2,...   the nodes (default: the allocation, SLURM_JOB_NODELIST)
#   --dry-run           print the srun command and the command each node runs, run nothing
#                       (works outside slurm with --hosts and --gpus-per-node or --cpu)
#   -h, --help          this text
# Resuming: submit the same command again; every node resumes from checkpoint_last.pt in the
# shared work dir (pretrain.sh --work-dir, on a file system all nodes see), also with another
# number of nodes, GPUs or CPU workers.
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

gpus_per_node="" cpu=0 procs_per_node="" port="" hosts="" dry_run=0
passthrough=()
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --gpus-per-node) need_value "$@"; gpus_per_node="$2"; shift 2 ;;
        --cpu) cpu=1; shift ;;
        --procs-per-node) need_value "$@"; procs_per_node="$2"; shift 2 ;;
        --port) need_value "$@"; port="$2"; shift 2 ;;
        --hosts) need_value "$@"; hosts="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --nproc|--nnodes|--rdzv-endpoint|--rdzv-id)
            die "$1 is derived from the allocation by launch_slurm.sh: choose the nodes with sbatch/salloc --nodes, the workers per node with --gpus-per-node N (GPUs) or --cpu --procs-per-node N (CPUs)" ;;
        *) passthrough+=("$1"); shift ;;
    esac
done
[[ -f "$pretrain" ]] || die "cannot find scripts/pretrain.sh (looked at $pretrain): submit from the repository root"

if [[ -n "$hosts" ]]; then
    read -r -a nodes <<< "${hosts//,/ }"
else
    [[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "not inside a slurm allocation (SLURM_JOB_NODELIST unset): use sbatch/salloc, or --hosts with --dry-run"
    command -v scontrol >/dev/null || die "scontrol not found: run this on a node of the slurm cluster"
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
fi
(( ${#nodes[@]} > 0 )) || die "no nodes"
nnodes=${#nodes[@]}
head_node="${nodes[0]}"

if (( cpu )); then
    [[ -z "$gpus_per_node" ]] || die "--gpus-per-node is for GPU workers; with --cpu give the CPU workers per node with --procs-per-node N"
    workers_source=""
    if [[ -z "$procs_per_node" && -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        procs_per_node="$SLURM_CPUS_PER_TASK"
        workers_source=" (the job's --cpus-per-task)"
    elif [[ -z "$procs_per_node" ]]; then
        procs_per_node=1
        workers_source=" (the job sets no --cpus-per-task: choose with --procs-per-node N)"
    fi
    [[ "$procs_per_node" =~ ^[1-9][0-9]*$ ]] || die "--procs-per-node must be a positive integer, got '$procs_per_node'"
    workers_per_node="$procs_per_node"
    worker_args=(--cpu --nproc "$workers_per_node")
    what="CPU worker(s) over gloo$workers_source"
else
    [[ -z "$procs_per_node" ]] || die "--procs-per-node is for CPU workers: add --cpu (on GPUs the workers per node are --gpus-per-node N)"
    if [[ -z "$gpus_per_node" ]]; then
        gpus_per_node="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}"
        gpus_per_node="${gpus_per_node##*:}"  # "a100:8" -> "8"
    fi
    [[ "$gpus_per_node" =~ ^[1-9][0-9]*$ ]] || die "cannot tell the GPUs per node ('$gpus_per_node'): ask sbatch/salloc for --gpus-per-node N or pass --gpus-per-node N; on nodes without GPUs add --cpu (see --help)"
    workers_per_node="$gpus_per_node"
    worker_args=(--nproc "$workers_per_node")
    what="GPU(s)"
fi

job_id="${SLURM_JOB_ID:-manual}"
if [[ -z "$port" ]]; then
    port=29500
    [[ "$job_id" =~ ^[0-9]+$ ]] && port=$((29500 + job_id % 1000))
fi
[[ "$port" =~ ^[0-9]+$ ]] && (( 10#$port > 0 && 10#$port < 65536 )) || die "--port must be a number from 1 to 65535, got '$port'"

node_cmd=(bash "$pretrain" --nnodes "$nnodes" "${worker_args[@]}"
          --rdzv-endpoint "$head_node:$port" --rdzv-id "xmoe-$job_id"
          "${passthrough[@]+"${passthrough[@]}"}")
srun_cmd=(srun --nodes "$nnodes" --ntasks-per-node 1 --kill-on-bad-exit=1)
# srun does not pass the job's --cpus-per-task on to its tasks in every slurm version (22.05 does
# not): without it, the workers of a node could share one core.
[[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && srun_cmd+=(--cpus-per-task "$SLURM_CPUS_PER_TASK")
srun_cmd+=("${node_cmd[@]}")

echo "[launch_slurm.sh] $nnodes node(s) x $workers_per_node $what, rendezvous at $head_node:$port" >&2
printf '%q ' "${srun_cmd[@]}"; echo
if (( dry_run )); then
    echo "[launch_slurm.sh] each node runs:" >&2
    bash "$pretrain" --dry-run "${node_cmd[@]:2}"
    exit 0
fi
command -v srun >/dev/null || die "srun not found: run this inside a slurm allocation (sbatch/salloc)"
exec "${srun_cmd[@]}"
