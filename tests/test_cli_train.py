"""End-to-end runs of fairseq's CLIs with the plugin on CPU (tiny model, toy corpus).

Each run takes seconds to tens of seconds on 2 cores; all are marked `slow`.
"""

import re

import pytest
import torch

from xmoe.checkpoint import fairseq_checkpoint_globals

pytestmark = pytest.mark.slow


def _qualified_name(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}" if hasattr(obj, "__qualname__") else str(obj)


def _mean(values):
    return sum(values) / len(values)


def test_xmoe_tiny_loss_falls_and_second_run_resumes_from_saved_update(cli, toy_data, tmp_path):
    save_dir = tmp_path / "ckpt"
    first = cli.run([cli.bin / "fairseq-train", *cli.train_args(toy_data, save_dir, max_update=30)], timeout=240,
                    log_file=tmp_path / "first.log")
    cli.ok(first)

    losses = [float(r["mlm_loss"]) for r in first.json_logs("train_inner")]
    assert len(losses) == 6, first.output[-3000:]
    assert _mean(losses[-2:]) < _mean(losses[:2]) - 0.1, f"MLM loss did not fall: {losses}"

    checkpoint = save_dir / "checkpoint_last.pt"
    assert checkpoint.is_file()
    # Everything the file pickles besides tensors is on the allow-list (and nothing else is needed).
    allowed = {_qualified_name(g) for g in fairseq_checkpoint_globals()}
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(str(checkpoint))) <= allowed

    # Same command, higher --max-update: fairseq must load checkpoint_last.pt (under forced
    # weights_only loading, see conftest.cli_env) and continue from update 30.
    second = cli.run([cli.bin / "fairseq-train", *cli.train_args(toy_data, save_dir, max_update=40)], timeout=180,
                     log_file=tmp_path / "second.log")
    cli.ok(second)
    assert re.search(r"Loaded checkpoint \S+checkpoint_last\.pt \(epoch \d+ @ 30 updates\)", second.output)
    updates = [int(r["num_updates"]) for r in second.json_logs("train_inner")]
    assert updates == [35, 40], updates
    assert float(second.json_logs("train_inner")[-1]["mlm_loss"]) < _mean(losses[:2])


def test_dense_tiny_has_no_moe_layer_and_trains(cli, toy_data, tmp_path):
    run = cli.run([cli.bin / "fairseq-train", *cli.train_args(toy_data, tmp_path / "ckpt", arch="dense_tiny",
                                                             max_update=10)], timeout=180)
    cli.ok(run)
    assert "MoE FFN in layers none" in run.output
    records = run.json_logs("train_inner")
    assert [int(r["num_updates"]) for r in records] == [5, 10]
    for record in records:
        assert float(record["balance_loss"]) == 0.0
        assert not [k for k in record if re.match(r"moe\d+_", k)], record
    assert float(records[-1]["mlm_loss"]) < float(records[0]["mlm_loss"]) + 0.05


def test_hydra_train_runs_tiny_cpu_config(cli, toy_data, tmp_path):
    save_dir = tmp_path / "ckpt"
    run = cli.run([cli.bin / "fairseq-hydra-train", "--config-dir", cli.repo / "configs" / "pretrain",
                   "--config-name", "tiny_cpu", f"task.data={toy_data}", f"checkpoint.save_dir={save_dir}",
                   f"common.user_dir={cli.user_dir}", "optimization.max_update=10", "common.log_interval=5"],
                  timeout=180, cwd=tmp_path)
    cli.ok(run)
    assert "xmoe_encoder: 4 layers of dim 64, MoE FFN in layers [1, 3]" in run.output  # xmoe_tiny sizes
    assert [int(r["num_updates"]) for r in run.json_logs("train_inner")] == [5, 10]
    assert (save_dir / "checkpoint_last.pt").is_file()


@pytest.mark.multiprocess
def test_two_process_expert_parallel_training_logs_routing_and_resumes(cli, toy_data, tmp_path):
    save_dir = tmp_path / "ckpt"

    def torchrun(max_update: int):
        args = cli.train_args(toy_data, save_dir, max_update=max_update)
        args[args.index("--batch-size") + 1] = "8"  # per worker
        return cli.run([cli.bin / "torchrun", "--standalone", "--nproc_per_node", "2",
                        cli.repo / "scripts" / "fairseq_train_torchrun.py", *args, "--moe-expert-parallel"],
                       timeout=240, log_file=tmp_path / f"torchrun_{max_update}.log")

    first = torchrun(10)
    cli.ok(first)
    assert "distributed init (rank 1)" in first.output
    assert "2 on this worker (expert parallel over 2 workers)" in first.output
    records = first.json_logs("train_inner")
    assert [int(r["num_updates"]) for r in records] == [5, 10]
    for layer in (1, 3):
        for stat in ("load_max", "load_min", "dropped", "entropy", "tau"):
            assert f"moe{layer}_{stat}" in records[-1], records[-1]
    assert float(records[-1]["bsz"]) == 16  # two workers of 8 sentences each
    # Each worker holds 2 of the 4 experts; the checkpoint (written by rank 0) holds all 4.
    state = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu")
    assert state["model"]["encoder.layers.1.ffn.experts.w1_EDF"].shape == (4, 64, 128)

    # Resuming across two workers: rank 0 reads the checkpoint and broadcasts it to rank 1.
    second = torchrun(15)
    cli.ok(second)
    assert re.search(r"Loaded checkpoint \S+ \(epoch \d+ @ 10 updates\)", second.output)
    assert [int(r["num_updates"]) for r in second.json_logs("train_inner")] == [15]
