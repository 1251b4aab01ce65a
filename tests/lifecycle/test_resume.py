"""Stopping and resuming pre-training (CPU, tiny model, toy corpus, fixed seed).

- exact: N updates in one go == N/2 updates, stop, resume to N: the same logged values at every
  update and bit-identical parameters and optimizer state at the end; in one process and in two
  expert-parallel processes (gloo), where every checkpoint (also the ones written mid-run)
  gathers both ranks' experts and their Adam moments.
- elastic: the two-process expert-parallel checkpoint resumed on 1 and on 4 processes: right
  after loading, every rank holds exactly the saved experts it is responsible for, with their
  Adam moments; training then goes on with a falling loss.
"""

from __future__ import annotations

import re

import pytest
import torch

from .lifecycle_helpers import (
    RECORD_LOADED_STATE,
    comparable_records,
    copy_save_dir,
    expert_keys,
    lifecycle_train_args,
    load,
    losses,
    mean,
    num_updates,
    tensor_differences,
    torchrun_command,
)

pytestmark = pytest.mark.slow

SINGLE_N = 16  # updates of the single-process runs
EP_N = 8  # updates of the two-process runs (each costs more)
RF_PROBE = ["--rf-probe-interval", "4"]  # on, to show the probe does not disturb training


def _loaded_at(run, updates: int) -> bool:
    return re.search(rf"Loaded checkpoint \S+checkpoint_last\.pt \(epoch \d+ @ {updates} updates\)", run.output) is not None


def _assert_same_final_state(dir_a, dir_b) -> None:
    a, b = load(dir_a / "checkpoint_last.pt"), load(dir_b / "checkpoint_last.pt")
    assert num_updates(a) == num_updates(b)
    assert tensor_differences(a["model"], b["model"]) == []
    assert tensor_differences(a["last_optimizer_state"], b["last_optimizer_state"]) == []
    assert a["optimizer_history"][-1]["lr_scheduler_state"] == b["optimizer_history"][-1]["lr_scheduler_state"]


def _assert_split_run_matches(whole, first, second, n: int) -> None:
    for run in (whole, first, second):
        assert run.returncode == 0, run.output[-5000:]
    assert _loaded_at(second, n // 2), second.output[-5000:]
    uninterrupted = comparable_records(whole)
    resumed = comparable_records(first) + comparable_records(second)
    assert [int(r["num_updates"]) for r in uninterrupted] == list(range(1, n + 1))
    assert [int(r["num_updates"]) for r in resumed] == list(range(1, n + 1))
    for expected, actual in zip(uninterrupted, resumed):
        assert actual == expected, f"update {expected['num_updates']} differs after resuming"


@pytest.fixture(scope="module")
def single_process_runs(cli, toy_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_single")

    def train(save_dir, max_update: int):
        args = lifecycle_train_args(cli, toy_data, save_dir, max_update) + RF_PROBE
        args += ["--tensorboard-logdir", root / f"tensorboard_{save_dir.name}_{max_update}"]
        return cli.run([cli.bin / "fairseq-train", *args], timeout=240, log_file=root / f"{save_dir.name}_{max_update}.log")

    whole = train(root / "whole", SINGLE_N)
    first = train(root / "split", SINGLE_N // 2)
    second = train(root / "split", SINGLE_N)
    return root, whole, first, second


@pytest.fixture(scope="module")
def expert_parallel_runs(cli, toy_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_ep")

    def train(save_dir, max_update: int):
        args = lifecycle_train_args(cli, toy_data, save_dir, max_update, batch_size=8)
        # Checkpoints in the middle of the runs too: saving gathers the experts' optimizer
        # state, which must leave the running optimizer untouched.
        args += ["--save-interval-updates", "3", "--moe-expert-parallel", *RF_PROBE]
        command = torchrun_command(cli, 2, args)
        return cli.run(command, timeout=300, log_file=root / f"{save_dir.name}_{max_update}.log")

    whole = train(root / "whole", EP_N)
    first = train(root / "split", EP_N // 2)
    second = train(root / "split", EP_N)
    return root, whole, first, second


def test_resuming_one_process_run_reproduces_every_logged_update_and_final_parameters(single_process_runs):
    root, whole, first, second = single_process_runs
    _assert_split_run_matches(whole, first, second, SINGLE_N)
    _assert_same_final_state(root / "whole", root / "split")


@pytest.mark.multiprocess
def test_resuming_two_process_expert_parallel_run_reproduces_updates_and_parameters(expert_parallel_runs):
    root, whole, first, second = expert_parallel_runs
    assert "2 on this worker (expert parallel over 2 workers)" in whole.output
    _assert_split_run_matches(whole, first, second, EP_N)
    _assert_same_final_state(root / "whole", root / "split")
    # Each rank held 2 of the 4 experts; the checkpoints hold all 4, with their Adam moments.
    state = load(root / "split" / "checkpoint_last.pt")
    keys = expert_keys(state["model"])
    assert keys and all(state["model"][k].shape[0] == 4 for k in keys)
    moments = [s["exp_avg"] for s in state["last_optimizer_state"]["state"].values()]
    assert sum(1 for m in moments if m.dim() == 3 and m.shape[0] == 4) == 4  # w1, w2 of 2 layers


def _optimizer_index(param_order: list[str]) -> dict[str, int]:
    return {name: index for index, name in enumerate(param_order)}


def _assert_loaded_exactly_the_saved_state(saved: dict, recorded: list[dict]) -> None:
    """Every rank's parameters and Adam state equal the checkpoint's (its slice for experts), and
    the ranks together hold every expert."""
    saved_optimizer = saved["last_optimizer_state"]["state"]
    held: dict[str, set[int]] = {}
    for rank_state in recorded:
        assert rank_state["num_updates"] == num_updates(saved)
        index_of = _optimizer_index(rank_state["param_order"])
        assert set(rank_state["optimizer"]) == set(index_of) and set(expert_keys(rank_state["model"])) <= set(index_of)
        for key, value in rank_state["model"].items():
            expected = saved["model"][key]
            layer = key.split(".experts.")[0] if ".experts." in key else None
            if layer is not None:
                first, local, total = rank_state["layout"][layer]
                assert expected.shape[0] == total
                expected = expected[first : first + local]
                held.setdefault(key, set()).update(range(first, first + local))
            assert torch.equal(value, expected), f"rank {rank_state['rank']}: {key} differs from the checkpoint"
            if key not in index_of:
                continue  # a second name of a tied parameter (lm_head.weight is embed_tokens.weight)
            moments = rank_state["optimizer"][key]
            saved_moments = saved_optimizer[index_of[key]]
            assert moments["step"] == saved_moments["step"]
            for moment in ("exp_avg", "exp_avg_sq"):
                expected_moment = saved_moments[moment]
                if layer is not None:
                    expected_moment = expected_moment[first : first + local]
                assert torch.equal(moments[moment], expected_moment), f"{key} {moment} (rank {rank_state['rank']})"
    assert held and all(experts == set(range(4)) for experts in held.values()), held


@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size", [1, 4])
def test_two_process_expert_parallel_checkpoint_resumes_on_another_world_size(
    expert_parallel_runs, cli, toy_data, tmp_path, world_size
):
    root, whole, _, _ = expert_parallel_runs
    assert whole.returncode == 0, whole.output[-5000:]
    save_dir = copy_save_dir(root / "whole", tmp_path / "ckpt", only=["checkpoint_last.pt"])
    saved = load(save_dir / "checkpoint_last.pt")
    assert num_updates(saved) == EP_N

    max_update = EP_N + 16
    # 32 sequences per update whatever the number of workers: less noise in the loss trend
    args = lifecycle_train_args(cli, toy_data, save_dir, max_update, batch_size=32 // world_size)
    if world_size > 1:
        args.append("--moe-expert-parallel")
    record_dir = tmp_path / "loaded"
    run = cli.run(
        torchrun_command(cli, world_size, args, script=RECORD_LOADED_STATE, script_args=(record_dir,)),
        timeout=300,
        log_file=tmp_path / "resume.log",
    )
    cli.ok(run)
    assert _loaded_at(run, EP_N), run.output[-5000:]
    recorded = [torch.load(record_dir / f"rank{r}.pt") for r in range(world_size)]
    assert all(r["world"] == world_size for r in recorded)
    if world_size == 4:
        assert "1 on this worker (expert parallel over 4 workers)" in run.output
    _assert_loaded_exactly_the_saved_state(saved, recorded)

    resumed = losses(run)
    assert [int(r["num_updates"]) for r in run.json_logs("train_inner")] == list(range(EP_N + 1, max_update + 1))
    # It goes on from the saved model (below where training started) and keeps learning.
    assert mean(resumed[:4]) < mean(losses(whole)[:4]) - 0.05, (losses(whole), resumed)
    assert mean(resumed[-4:]) < mean(resumed[:4]) - 0.05, resumed
    # The new checkpoint again holds all 4 experts.
    final = load(save_dir / "checkpoint_last.pt")
    assert num_updates(final) == max_update
    assert all(final["model"][k].shape[0] == 4 for k in expert_keys(final["model"]))


def test_routing_fluctuation_is_logged_every_m_updates_to_the_log_and_tensorboard(single_process_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, whole, _, _ = single_process_runs
    assert whole.returncode == 0, whole.output[-5000:]
    probe_every = int(RF_PROBE[1])
    # The probe at update 0 sets the reference; from then on every M updates a value per MoE
    # layer (logged with the update that follows the probe), null in the other log lines.
    for layer in (1, 3):
        logged = {int(r["num_updates"]): r.get(f"moe{layer}_rf") for r in whole.json_logs("train_inner")}
        measured = {u: float(v) for u, v in logged.items() if v is not None}
        assert sorted(measured) == list(range(probe_every + 1, SINGLE_N + 1, probe_every)), logged
        assert all(0.0 <= v <= 1.0 for v in measured.values())
        assert any(v > 0 for v in measured.values()), measured  # early training does move tokens
        events = EventAccumulator(str(root / f"tensorboard_whole_{SINGLE_N}" / "train_inner"))
        events.Reload()
        steps = [e.step for e in events.Scalars(f"moe{layer}_rf")]
        assert steps == sorted(measured)
