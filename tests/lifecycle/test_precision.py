"""fp16 and bf16 pre-training on CPU with fairseq's memory-efficient fp16/bf16 optimizers (the
model itself in half precision, as the GPU configs run it), for every gate of configs/pretrain:
20 updates with a finite, falling loss; the routers stay in fp32 and train; frozen routing;
resuming from the middle reproduces the run exactly; the export holds the checkpoint's weights.
Also fairseq's plain fp16 optimizer, two expert-parallel processes over gloo in fp16, and the
one-line refusal of fairseq-train's --bf16 (which implies --tpu).

Per precision, the runs share one process (hydra_train_runs.py) with the commands that
scripts/pretrain.sh --dry-run prints, the resumed runs included (checkpoint.restore_file); one
resume per precision goes through scripts/pretrain.sh itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from export.conftest import pretrain_data  # noqa: F401  (fixture: a data-prep corpus with its sentencepiece model)
from safetensors.torch import load_file

from xmoe.moe.routers import TAU_INIT

from .lifecycle_helpers import (
    REPO_ROOT,
    comparable_records,
    expert_keys,
    load,
    losses,
    mean,
    num_updates,
    router_keys,
    tensor_differences,
)
from .test_launch_scripts import PRETRAIN, printed_command, run_script

pytestmark = pytest.mark.slow

RUNS_IN_ONE_PROCESS = Path(__file__).resolve().parent / "hydra_train_runs.py"
GATES = sorted(path.stem for path in (REPO_ROOT / "configs" / "pretrain" / "gate").glob("*.yaml"))
PRECISIONS = {
    "fp16": (torch.float16, ["common.fp16=true", "common.memory_efficient_fp16=true"]),
    "bf16": (torch.bfloat16, ["common.bf16=true", "common.memory_efficient_bf16=true"]),
}
UPDATES = 20
# tiny_cpu with 2 layers (one MoE layer), short samples and no validation: seconds per run.
SMALL_RUN = [
    "task=mlm_tlm", "model.encoder_layers=2", "dataset.batch_size=8", "task.tokens_per_sample=32",
    f"optimization.max_update={UPDATES}", f"lr_scheduler.total_num_update={UPDATES}", "common.log_interval=1",
    "dataset.disable_validation=true", f"checkpoint.save_interval_updates={UPDATES // 2}",
]
MIDDLE = f"checkpoint_1_{UPDATES // 2}.pt"
FROZEN = "xmoe_router_frozen_after_10"
PLAIN_FP16 = "xmoe_plain_fp16_optimizer"
RESUMED = "{}_resumed_at_10"
RESUMED_WITH_PRETRAIN_SH = "xmoe"


def runs_of(precision: str, root: Path) -> dict[str, list[str]]:
    """Run name -> overrides beyond SMALL_RUN and the precision's flags (runs write to root/<name>)."""
    runs = {gate: [f"gate={gate}"] for gate in GATES}
    for gate in GATES:  # from the update-10 checkpoint of the run above, into a folder of its own
        runs[RESUMED.format(gate)] = [f"gate={gate}", f"checkpoint.restore_file={root / gate / 'checkpoints' / MIDDLE}"]
    runs[FROZEN] = ["gate=xmoe", f"model.moe_freeze_router_after={UPDATES // 2}"]
    if precision == "fp16":
        # fairseq's plain fp16 optimizer: fp32 master copies of the half parameters. Its default,
        # one flat copy, is made on torch.cuda.current_device(); per-parameter copies run on CPU.
        runs[PLAIN_FP16] = ["gate=xmoe", "common.memory_efficient_fp16=false", "common.fp16_no_flatten_grads=true"]
    return runs


def pretrain_args(work_dir: Path, data: Path, precision: str, overrides: list[str]) -> list:
    return ["--cpu", "--config", "tiny_cpu", "--work-dir", work_dir, f"task.data={data}", *SMALL_RUN,
            *PRECISIONS[precision][1], *overrides]


@dataclasses.dataclass
class Trained:
    precision: str
    dtype: torch.dtype
    data: Path
    root: Path  # root/<run name>/checkpoints
    runs: dict  # run name -> its part of the output (a CliRun)

    def checkpoint(self, run: str, name: str = "checkpoint_last.pt") -> dict:
        return load(self.root / run / "checkpoints" / name)


@pytest.fixture(scope="module", params=sorted(PRECISIONS))
def trained(request, cli, pretrain_data, tmp_path_factory) -> Trained:  # noqa: F811
    precision = request.param
    _, data = pretrain_data
    root = tmp_path_factory.mktemp(precision)
    names, commands = [], []
    for name, overrides in runs_of(precision, root).items():
        (root / name).mkdir()  # pretrain.sh makes its work dir
        dry_run = run_script(PRETRAIN, "--dry-run", *pretrain_args(root / name, data, precision, overrides))
        names.append(name)
        commands.append(printed_command(dry_run)[1:])  # without the program: fairseq-hydra-train
    (root / "runs.json").write_text(json.dumps(commands))
    run = cli.run([sys.executable, RUNS_IN_ONE_PROCESS, root / "runs.json"], timeout=600, log_file=root / "runs.log")
    cli.ok(run)
    outputs = run.output.split("==> run ")[1:]
    assert len(outputs) == len(names), run.output[-3000:]
    runs = {name: dataclasses.replace(run, output=output) for name, output in zip(names, outputs)}
    return Trained(precision, PRECISIONS[precision][0], data, root, runs)


def logged(run) -> list[dict]:
    """The train_inner records that must match between a run and its resumed copy. Perplexities
    are derived from the logged losses; the task's per-group ppl_tlm reads 0 for a log line
    without TLM batches in a long run but is absent right after a resume."""
    return [{k: v for k, v in r.items() if not k.startswith("ppl")} for r in comparable_records(run)]


def assert_resumed_exactly(whole_run, whole_dir: Path, resumed_run, resumed_dir: Path) -> None:
    assert [int(r["num_updates"]) for r in logged(resumed_run)] == list(range(UPDATES // 2 + 1, UPDATES + 1))
    assert logged(resumed_run) == logged(whole_run)[UPDATES // 2:]
    a, b = load(whole_dir / "checkpoint_last.pt"), load(resumed_dir / "checkpoint_last.pt")
    assert num_updates(a) == num_updates(b) == UPDATES
    assert tensor_differences(a["model"], b["model"]) == []
    assert tensor_differences(a["last_optimizer_state"], b["last_optimizer_state"]) == []


def test_every_gate_trains_in_half_precision_with_a_finite_falling_loss(trained):
    for name, run in trained.runs.items():
        if name.endswith(RESUMED.format("")):
            continue
        assert [int(r["num_updates"]) for r in run.json_logs("train_inner")] == list(range(1, UPDATES + 1)), name
        curve = losses(run)
        assert all(math.isfinite(v) for v in curve), (name, curve)
        assert mean(curve[-5:]) < mean(curve[:5]) - 0.1, (name, curve)


def test_routers_stay_fp32_and_train_while_the_rest_is_half(trained):
    def representable_in_half(tensor: torch.Tensor) -> bool:
        return torch.equal(tensor.to(trained.dtype).float(), tensor)

    for gate in GATES:
        middle, last = trained.checkpoint(gate, MIDDLE), trained.checkpoint(gate)
        state = last["model"]
        routers = router_keys(state)
        assert routers, gate
        # fairseq writes every tensor in fp32; what the model held shows in the values: the rest
        # of the model was trained in half precision, the routers were not.
        assert [k for k in routers if representable_in_half(state[k])] == [], gate
        assert [k for k in state if k not in routers and not representable_in_half(state[k])] == [], gate
        assert tensor_differences({k: middle["model"][k] for k in routers}, {k: state[k] for k in routers}) != []
        for key in (k for k in routers if k.endswith(".tau")):  # the learnable temperature moves
            assert state[key].item() != pytest.approx(TAU_INIT, abs=1e-4), (gate, key, state[key])


def test_frozen_routing_in_half_precision_stops_the_router_only(trained):
    middle = trained.checkpoint(FROZEN, MIDDLE)["model"]
    last = trained.checkpoint(FROZEN)["model"]
    routers, experts = router_keys(last), expert_keys(last)
    assert tensor_differences({k: middle[k] for k in routers}, {k: last[k] for k in routers}) == []
    assert len(tensor_differences({k: middle[k] for k in experts}, {k: last[k] for k in experts})) == len(experts)


def test_every_gate_resumes_from_the_middle_exactly(trained):
    for gate in GATES:
        resumed = RESUMED.format(gate)
        assert "Loaded checkpoint" in trained.runs[resumed].output, gate
        assert_resumed_exactly(trained.runs[gate], trained.root / gate / "checkpoints",
                               trained.runs[resumed], trained.root / resumed / "checkpoints")


def test_resuming_with_pretrain_sh_is_exact(trained, cli, tmp_path):
    gate = RESUMED_WITH_PRETRAIN_SH
    (tmp_path / "checkpoints").mkdir()
    shutil.copy2(trained.root / gate / "checkpoints" / MIDDLE, tmp_path / "checkpoints" / "checkpoint_last.pt")
    resumed = cli.run(["bash", PRETRAIN, *pretrain_args(tmp_path, trained.data, trained.precision, [f"gate={gate}"])],
                      timeout=300, log_file=tmp_path / "resumed.log")
    cli.ok(resumed)
    assert "resuming from" in resumed.output
    assert_resumed_exactly(trained.runs[gate], trained.root / gate / "checkpoints", resumed, tmp_path / "checkpoints")


def test_export_of_every_gate_holds_the_checkpoints_weights(trained, tmp_path):
    from xmoe.export import export

    for gate in GATES:
        checkpoint = trained.root / gate / "checkpoints" / "checkpoint_last.pt"
        # export() reloads its output with xmoe.hub and compares features (within 1e-5) itself
        out = export(str(checkpoint), str(tmp_path / gate), data_dir=str(trained.data), log=lambda *_: None)
        stored = load_file(str(out / "model.safetensors"))
        state = load(checkpoint)["model"]
        for key, tensor in stored.items():
            assert tensor.dtype == torch.float32, (gate, key)
            assert torch.equal(tensor, state[key].float()), (gate, key)  # half -> fp32 is exact


@pytest.mark.multiprocess
def test_two_expert_parallel_processes_train_in_fp16_over_gloo(cli, pretrain_data, tmp_path):  # noqa: F811
    _, data = pretrain_data
    run = cli.run(["bash", PRETRAIN, "--nproc", "2", *pretrain_args(tmp_path, data, "fp16", [
        "model.moe_expert_parallel=true", "dataset.batch_size=4", "optimization.max_update=6",
        "checkpoint.save_interval_updates=0"])], timeout=300, log_file=tmp_path / "run.log")
    cli.ok(run)
    assert "2 on this worker (expert parallel over 2 workers)" in run.output
    curve = losses(run)
    assert len(curve) == 6 and all(math.isfinite(v) for v in curve), curve
    state = load(tmp_path / "checkpoints" / "checkpoint_last.pt")["model"]
    experts = expert_keys(state)
    assert state["encoder.layers.1.ffn.experts.w1_EDF"].shape[0] == 4  # both workers' experts
    assert all(torch.equal(state[k].half().float(), state[k]) for k in experts)  # trained in fp16
    assert not any(torch.equal(state[k].half().float(), state[k]) for k in router_keys(state))


def test_fairseq_train_bf16_refuses_tpu_mode_in_one_line(cli, toy_data, tmp_path):
    run = cli.run([cli.bin / "fairseq-train", *cli.train_args(toy_data, tmp_path, max_update=2),
                   "--memory-efficient-bf16"], timeout=180)
    assert run.returncode == 1, run.output[-3000:]
    assert "Traceback" not in run.output
    assert run.output.strip().splitlines()[-1].startswith(
        "xmoe: fairseq's TPU mode is on (fairseq-train --bf16 and --memory-efficient-bf16 imply --tpu)"
    ), run.output[-3000:]
