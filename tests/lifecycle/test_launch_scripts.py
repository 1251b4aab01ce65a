"""scripts/pretrain.sh and scripts/launch_slurm.sh: the commands they build (dry runs), how they
fail, and a real CPU run that re-running resumes, on another number of processes."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from .lifecycle_helpers import REPO_ROOT, load, num_updates

PRETRAIN = REPO_ROOT / "scripts" / "pretrain.sh"
LAUNCH_SLURM = REPO_ROOT / "scripts" / "launch_slurm.sh"


def run_script(script: Path, *args, env: dict = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO_ROOT)


def printed_command(result: subprocess.CompletedProcess) -> list[str]:
    """The command a dry run prints on stdout (its last line), split the way bash would."""
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout.strip().splitlines()[-1])


def test_scripts_parse():
    for script in (PRETRAIN, LAUNCH_SLURM):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_pretrain_cpu_processes_go_through_torchrun_with_the_cpu_group(tmp_path):
    command = printed_command(run_script(PRETRAIN, "--dry-run", "--cpu", "--nproc", "2", "--config", "tiny_cpu",
                                         "--work-dir", tmp_path, "task.data=/data", "model.moe_expert_parallel=true"))
    assert Path(command[0]).name == "torchrun"
    assert command[1:5] == ["--standalone", "--nproc-per-node", "2", str(REPO_ROOT / "scripts" / "fairseq_train_torchrun.py")]
    assert command[5:10] == ["--hydra", "--config-dir", str(REPO_ROOT / "configs" / "pretrain"), "--config-name", "tiny_cpu"]
    assert f"checkpoint.save_dir={tmp_path}/checkpoints" in command
    assert f"common.user_dir={REPO_ROOT}/xmoe" in command
    assert "distributed=cpu" in command
    assert command[-2:] == ["task.data=/data", "model.moe_expert_parallel=true"]  # passed through, last: they win


def test_pretrain_picks_the_distributed_group_from_the_gpus_unless_given(tmp_path):
    one = printed_command(run_script(PRETRAIN, "--dry-run", "--work-dir", tmp_path))
    assert Path(one[0]).name == "fairseq-hydra-train" and "distributed=single_gpu" in one
    eight = printed_command(run_script(PRETRAIN, "--dry-run", "--nproc", "8", "--work-dir", tmp_path))
    assert "--nproc-per-node" in eight and "distributed=multi_gpu" in eight
    own = printed_command(run_script(PRETRAIN, "--dry-run", "--nproc", "8", "distributed=single_gpu"))
    assert [a for a in own if a.startswith("distributed=")] == ["distributed=single_gpu"]


def test_pretrain_multi_node_uses_a_rendezvous(tmp_path):
    command = printed_command(run_script(PRETRAIN, "--dry-run", "--nnodes", "2", "--nproc", "4",
                                         "--rdzv-endpoint", "node1:29500", "--rdzv-id", "job7"))
    joined = " ".join(command)
    assert "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint node1:29500 --rdzv-id job7 --nproc-per-node 4" in joined
    # one node given an endpoint (launch_slurm.sh on a one-node job) meets there too, not --standalone
    one_node = printed_command(run_script(PRETRAIN, "--dry-run", "--cpu", "--nproc", "2", "--rdzv-endpoint", "node1:29500"))
    assert "--nnodes 1 --rdzv-backend c10d --rdzv-endpoint node1:29500 --rdzv-id xmoe --nproc-per-node 2" in " ".join(one_node)


def test_pretrain_says_whether_it_resumes(tmp_path):
    fresh = run_script(PRETRAIN, "--dry-run", "--cpu", "--work-dir", tmp_path)
    assert "new run" in fresh.stderr
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "checkpoint_last.pt").write_bytes(b"")
    again = run_script(PRETRAIN, "--dry-run", "--cpu", "--work-dir", tmp_path)
    assert f"resuming from {tmp_path}/checkpoints/checkpoint_last.pt" in again.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nproc", "0"], "--nproc must be a positive integer"),
        (["--nnodes", "2"], "needs --rdzv-endpoint"),
        (["--config", "nope"], "no config 'nope'"),
        (["--bogus"], "unknown option --bogus"),
        (["--nproc"], "--nproc needs a value"),
        (["--cpu", "task.data=/does/not/exist"], "is not a folder"),
        (["--nproc", "2"], "GPUs"),  # this machine has none: it says so and points to --cpu
    ],
)
def test_pretrain_fails_loudly(args, message):
    result = run_script(PRETRAIN, *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def launch_slurm_dry_run(*args, **env) -> tuple[subprocess.CompletedProcess, list[str], list[str]]:
    """A launch_slurm.sh dry run outside slurm: (result, the srun command, the command each node runs)."""
    result = run_script(LAUNCH_SLURM, "--dry-run", *args, env={"PATH": "/usr/bin:/bin", **env})
    assert result.returncode == 0, result.stderr
    srun, node = (shlex.split(line) for line in result.stdout.strip().splitlines())
    return result, srun, node


def test_launch_slurm_dry_run_prints_srun_and_each_nodes_torchrun(tmp_path):
    _, srun, node = launch_slurm_dry_run("--hosts", "gpu01,gpu02", "--gpus-per-node", "8", "--work-dir", tmp_path,
                                         "task.data=/data", "model=base_paper", SLURM_JOB_ID="42")
    assert srun[:6] == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    assert srun[6:8] == ["bash", str(PRETRAIN)]
    assert srun[-4:] == ["--work-dir", str(tmp_path), "task.data=/data", "model=base_paper"]
    joined = " ".join(node)
    # the port follows the job id, so jobs sharing a node do not collide
    assert "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint gpu01:29542 --rdzv-id xmoe-42 --nproc-per-node 8" in joined
    assert "distributed=multi_gpu" in node and node[-2:] == ["task.data=/data", "model=base_paper"]


def test_launch_slurm_cpu_mode_runs_cpu_workers_per_node_at_one_rendezvous(tmp_path):
    args = ("--hosts", "cpu01,cpu02", "--cpu", "--config", "tiny_cpu", "--work-dir", tmp_path, "task.data=/data")
    result, srun, node = launch_slurm_dry_run(*args, SLURM_JOB_ID="7", SLURM_CPUS_PER_TASK="3")
    # srun hands the job's CPUs to each node's task (slurm 22.05 does not by itself)
    assert srun[:8] == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1", "--cpus-per-task", "3"]
    assert srun[8:16] == ["bash", str(PRETRAIN), "--nnodes", "2", "--cpu", "--nproc", "3", "--rdzv-endpoint"]
    assert "2 node(s) x 3 CPU worker(s) over gloo (the job's --cpus-per-task), rendezvous at cpu01:29507" in result.stderr
    joined = " ".join(node)
    assert "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint cpu01:29507 --rdzv-id xmoe-7 --nproc-per-node 3" in joined
    assert "distributed=cpu" in node and node[-1] == "task.data=/data"

    result, srun, node = launch_slurm_dry_run(*args, "--procs-per-node", "2", "--port", "1234")
    assert "--cpus-per-task" not in srun
    assert "--rdzv-endpoint cpu01:1234 --rdzv-id xmoe-manual --nproc-per-node 2" in " ".join(node)

    result, _, node = launch_slurm_dry_run("--hosts", "cpu01", "--cpu", "--config", "tiny_cpu")
    assert "1 CPU worker(s) over gloo (the job sets no --cpus-per-task: choose with --procs-per-node N)" in result.stderr
    assert Path(node[0]).name == "fairseq-hydra-train"  # one worker in all: no torchrun


def test_launch_slurm_reads_the_gpus_of_the_allocation_and_fails_outside_one():
    _, _, node = launch_slurm_dry_run("--hosts", "a", SLURM_GPUS_PER_NODE="h100:4")
    assert "--nproc-per-node 4" in " ".join(node)
    outside = run_script(LAUNCH_SLURM, "--dry-run", env={"PATH": "/usr/bin:/bin"})
    assert outside.returncode != 0 and "not inside a slurm allocation" in outside.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "cannot tell the GPUs per node (''): ask sbatch/salloc for --gpus-per-node N or pass --gpus-per-node N; "
             "on nodes without GPUs add --cpu"),
        (["--gpus-per-node", "2", "--nproc", "3"], "--nproc is derived from the allocation by launch_slurm.sh"),
        (["--cpu", "--gpus-per-node", "2"], "--gpus-per-node is for GPU workers; with --cpu give the CPU workers per node "
                                          "with --procs-per-node N"),
        (["--procs-per-node", "2"], "--procs-per-node is for CPU workers: add --cpu"),
        (["--cpu", "--procs-per-node", "0"], "--procs-per-node must be a positive integer, got '0'"),
        (["--cpu", "--port", "70000"], "--port must be a number from 1 to 65535, got '70000'"),
    ],
)
def test_launch_slurm_says_what_to_do(args, message):
    result = run_script(LAUNCH_SLURM, "--dry-run", "--hosts", "a", *args, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert f"launch_slurm.sh: error: {message}" in result.stderr, result.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
def test_pretrain_on_two_cpu_processes_then_the_same_command_resumes_on_one(cli, toy_data, tmp_path):
    common = ["--cpu", "--config", "tiny_cpu", "--work-dir", tmp_path, f"task.data={toy_data}",
              "common.log_interval=2", "dataset.batch_size=8", "checkpoint.save_interval_updates=0"]
    first = cli.run(["bash", PRETRAIN, "--nproc", "2", *common, "model.moe_expert_parallel=true",
                     "optimization.max_update=4"], timeout=240, log_file=tmp_path / "first.log")
    cli.ok(first)
    assert "new run" in first.output and "torchrun" in first.output  # the printed command
    assert "2 on this worker (expert parallel over 2 workers)" in first.output
    assert [int(r["num_updates"]) for r in first.json_logs("train_inner")] == [2, 4]
    assert num_updates(load(tmp_path / "checkpoints" / "checkpoint_last.pt")) == 4

    second = cli.run(["bash", PRETRAIN, *common, "optimization.max_update=8"], timeout=240,
                     log_file=tmp_path / "second.log")
    cli.ok(second)
    assert f"resuming from {tmp_path}/checkpoints/checkpoint_last.pt" in second.output
    assert re.search(r"Loaded checkpoint \S+checkpoint_last\.pt \(epoch \d+ @ 4 updates\)", second.output)
    assert [int(r["num_updates"]) for r in second.json_logs("train_inner")] == [6, 8]
    assert (tmp_path / "train.log").is_file() and any((tmp_path / "tensorboard").iterdir())


def test_torchrun_wrapper_hydra_mode_appends_distributed_overrides(script):
    wrapper = script("fairseq_train_torchrun")
    rank1 = wrapper.hydra_overrides(["--config-name", "pretrain"], {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert rank1 == [
        "distributed_training.distributed_world_size=4",
        "distributed_training.distributed_rank=1",
        "distributed_training.distributed_init_method=env://",
        "distributed_training.distributed_no_spawn=true",
        "distributed_training.device_id=1",
        "hydra.output_subdir=null",  # only rank 0 writes Hydra's copy of the config
    ]
    rank0 = wrapper.hydra_overrides([], {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4"})
    assert "hydra.output_subdir=null" not in rank0
    with pytest.raises(SystemExit, match="torchrun"):
        wrapper.hydra_overrides([], {})
