"""scripts/launch_slurm.sh under a real slurm: a one-node cluster of this machine (Debian's
packages, installed when missing; see slurm_cluster.py), jobs submitted with sbatch as a user
would, CPU workers over gloo meeting at the launcher's c10d rendezvous."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .lifecycle_helpers import REPO_ROOT, load, num_updates
from .slurm_cluster import SlurmCluster, free_port, install_slurm

LAUNCH_SLURM = REPO_ROOT / "scripts" / "launch_slurm.sh"


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    reason = install_slurm()
    if reason:
        pytest.skip(f"cannot install slurm here: {reason}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        reason = cluster.start()
        if reason:
            pytest.skip(f"cannot start a slurm cluster on this machine: {reason}")
        yield cluster
    finally:
        cluster.stop()


def sbatch(cli, cluster: SlurmCluster, out_dir: Path, sbatch_options: list, launcher_args: list, timeout: float = 240):
    """`sbatch --wait [options] scripts/launch_slurm.sh [args]` from the repository root, as a user
    submits it. Returns the job's output file as a run with sbatch's exit code (the job's), and the job id."""
    submitted = cli.run(cluster.command(["sbatch", "--wait", f"--output={out_dir}/xmoe-pretrain-%j.out",
                                         *sbatch_options, LAUNCH_SLURM, *launcher_args]), timeout=timeout)
    job = re.search(r"Submitted batch job (\d+)", submitted.output)
    assert job, f"sbatch did not submit:\n{submitted.output}\n{cluster.logs()}"
    out_file = out_dir / f"xmoe-pretrain-{job.group(1)}.out"
    output = out_file.read_text() if out_file.exists() else f"(no output file {out_file})"
    return cli.Result(returncode=submitted.returncode, output=output), job.group(1)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sbatch_cpu_job_trains_sharded_experts_and_the_same_sbatch_resumes(slurm_cluster, cli, toy_data, tmp_path):
    port = free_port()
    work_dir = tmp_path / "work"
    # Sized for this one-node cluster; the header's GPU request is cancelled as the README says.
    options = ["--gpus-per-node=0", "--nodes=1", f"--cpus-per-task={min(2, slurm_cluster.cpus)}"]
    args = ["--cpu", "--procs-per-node", "2", "--port", port, "--config", "tiny_cpu", "--work-dir", work_dir,
            f"task.data={toy_data}", "model.moe_expert_parallel=true", "common.log_interval=2",
            "dataset.batch_size=8", "checkpoint.save_interval_updates=0"]
    rendezvous = f"{slurm_cluster.node}:{port}"

    first, job = sbatch(cli, slurm_cluster, tmp_path, options, args + ["optimization.max_update=4"])
    cli.ok(first)
    assert f"1 node(s) x 2 CPU worker(s) over gloo, rendezvous at {rendezvous}" in first.output
    assert f"--rdzv-backend c10d --rdzv-endpoint {rendezvous} --rdzv-id xmoe-{job} --nproc-per-node 2" in first.output
    assert "new run" in first.output
    assert "2 on this worker (expert parallel over 2 workers)" in first.output
    assert [int(r["num_updates"]) for r in first.json_logs("train_inner")] == [2, 4]
    assert num_updates(load(work_dir / "checkpoints" / "checkpoint_last.pt")) == 4

    second, _ = sbatch(cli, slurm_cluster, tmp_path, options, args + ["optimization.max_update=8"])
    cli.ok(second)
    assert f"resuming from {work_dir}/checkpoints/checkpoint_last.pt on 2 worker(s)" in second.output
    assert re.search(r"Loaded checkpoint \S+checkpoint_last\.pt \(epoch \d+ @ 4 updates\)", second.output)
    assert [int(r["num_updates"]) for r in second.json_logs("train_inner")] == [6, 8]
    assert num_updates(load(work_dir / "checkpoints" / "checkpoint_last.pt")) == 8


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sbatch_on_a_cluster_without_gpus_needs_the_override_and_cpu(slurm_cluster, cli, tmp_path):
    # The header asks for GPUs: sbatch refuses before anything runs, unless told otherwise.
    refused = cli.run(slurm_cluster.command(["sbatch", "--test-only", LAUNCH_SLURM]), timeout=30)
    assert refused.returncode != 0 and "Invalid generic resource" in refused.output, refused.output
    sized = ["--gpus-per-node=0", "--nodes=1", "--cpus-per-task=1"]
    accepted = cli.run(slurm_cluster.command(["sbatch", "--test-only", *sized, LAUNCH_SLURM]), timeout=30)
    assert accepted.returncode == 0, accepted.output
    # Without --cpu, the job says what to do instead of failing inside pretrain.sh.
    job_output, _ = sbatch(cli, slurm_cluster, tmp_path, sized, ["--config", "tiny_cpu"], timeout=60)
    assert job_output.returncode != 0
    assert "cannot tell the GPUs per node" in job_output.output and "add --cpu" in job_output.output, job_output.output
