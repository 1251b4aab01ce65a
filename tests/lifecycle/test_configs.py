"""configs/pretrain: every group option composes into a config fairseq accepts, every option of
the model, task, criterion, optimizer and scheduler can be overridden as key=value, and the
option lists kept in yaml match the plugin's dataclasses."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

import fairseq  # noqa: F401  (xmoe registers its fairseq components only once fairseq is loaded)
import pytest
import yaml
from omegaconf import OmegaConf

import xmoe.criterions  # noqa: F401
import xmoe.models  # noqa: F401
import xmoe.tasks  # noqa: F401
from xmoe.criterions.xmoe_masked_lm import XMoEMaskedLmConfig
from xmoe.models.xmoe_encoder import ARCHITECTURES, XMoEEncoderConfig, apply_architecture
from xmoe.tasks.mlm_tlm import MlmTlmConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "pretrain"
PRIMARY = ["pretrain", "tiny_cpu"]
MODEL_PRESETS = {
    "tiny": "xmoe_tiny", "small": "xmoe_small", "base": "xmoe_base", "base_paper": "xmoe_base_paper",
    "large": "xmoe_large", "dense_tiny": "dense_tiny", "dense_small": "dense_small",
    "dense_base": "dense_base", "dense_large": "dense_large",
}
GATES = {  # option -> (moe_gate, moe_gate_fn, moe_top_k)
    "xmoe": ("xmoe", "softmax", 1), "xmoe_sigmoid": ("xmoe", "sigmoid", 1), "switch": ("switch", "softmax", 1),
    "switch_sigmoid": ("switch_sigmoid", "sigmoid", 1), "gshard": ("gshard", "softmax", 2),
    "xmoe_torchscale": ("xmoe_torchscale", "softmax", 1),
}
TASKS = {"mlm": "masked_lm", "mlm_tlm": "xmoe_mlm_tlm"}
DISTRIBUTED = {  # option -> (cpu, backend, ddp backend, experts sharded)
    "cpu": (True, "gloo", "legacy_ddp", False), "single_gpu": (False, "nccl", "legacy_ddp", False),
    "multi_gpu": (False, "nccl", "legacy_ddp", True),
}


def compose(config_name: str, overrides: list[str] = ()):
    """The config fairseq-hydra-train composes (its schema stored under the config's name, as
    fairseq_cli.hydra_train does), completed the way fairseq_cli.train completes it."""
    from fairseq.dataclass.initialize import add_defaults, hydra_init
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    hydra_init(config_name)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.1"):
        cfg = hydra_compose(config_name=config_name, overrides=["task.data=/data", *overrides])
    add_defaults(cfg)  # merges each component's dataclass: fails on unknown keys or bad values
    return cfg


def test_every_group_option_exists():
    def options(group):
        return {p.stem for p in (CONFIG_DIR / group).glob("*.yaml")}

    assert set(MODEL_PRESETS) <= options("model")
    assert options("gate") == set(GATES)
    assert options("task") == set(TASKS)
    assert options("optimization") == {"paper_base", "cpu_demo"}
    assert options("distributed") == set(DISTRIBUTED)


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_model_presets_compose_to_their_architecture(preset):
    cfg = compose("pretrain", [f"model={preset}"])
    arch = MODEL_PRESETS[preset]
    assert cfg.model._name == arch
    model_cfg = XMoEEncoderConfig.from_namespace(cfg.model)
    apply_architecture(model_cfg, arch)
    for option, value in ARCHITECTURES[arch].items():
        assert getattr(model_cfg, option) == value, option


@pytest.mark.parametrize("gate", sorted(GATES))
def test_gates_compose(gate):
    cfg = compose("pretrain", [f"gate={gate}"])
    assert (cfg.model.moe_gate, cfg.model.moe_gate_fn, cfg.model.moe_top_k) == GATES[gate]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tasks_compose(task):
    cfg = compose("pretrain", [f"task={task}"])
    assert cfg.task._name == TASKS[task]
    assert cfg.task.data == "/data" and cfg.task.tokens_per_sample == 512


@pytest.mark.parametrize("distributed", sorted(DISTRIBUTED))
def test_distributed_options_compose(distributed):
    cfg = compose("pretrain", [f"distributed={distributed}"])
    cpu, backend, ddp, sharded = DISTRIBUTED[distributed]
    assert cfg.common.cpu == cpu
    assert cfg.distributed_training.distributed_backend == backend
    assert cfg.distributed_training.ddp_backend == ddp
    assert cfg.model.moe_expert_parallel == sharded
    if not cpu:  # the fp16 optimizer that keeps the parameters (and their expert layout)
        assert cfg.common.fp16 and cfg.common.memory_efficient_fp16


def test_paper_recipe_is_the_default_of_pretrain():
    cfg = compose("pretrain")
    assert cfg.model._name == "xmoe_base" and cfg.model.moe_gate == "xmoe" and cfg.task._name == "masked_lm"
    assert cfg.optimizer._name == "adam" and cfg.optimizer.adam_betas == "(0.9,0.98)"
    gpus_of_two_dgx2 = 32
    assert cfg.dataset.batch_size * cfg.optimization.update_freq[0] * gpus_of_two_dgx2 == 2048
    assert cfg.optimization.max_update == 125_000 == cfg.lr_scheduler.total_num_update
    assert cfg.task.tokens_per_sample == 512


def test_cpu_demo_is_the_default_of_tiny_cpu():
    cfg = compose("tiny_cpu")
    assert cfg.model._name == "xmoe_tiny" and cfg.common.cpu
    assert cfg.distributed_training.distributed_backend == "gloo"
    assert cfg.optimization.max_update == 200 == cfg.lr_scheduler.total_num_update
    assert cfg.model.dropout == 0.0 and cfg.task.tokens_per_sample == 64


def _fields(dataclass) -> set[str]:
    return {f.name for f in dataclasses.fields(dataclass) if f.name != "_name"}


@pytest.mark.parametrize("config_name", PRIMARY)
def test_every_option_of_model_task_criterion_optimizer_and_scheduler_can_be_overridden(config_name):
    from fairseq.optim.adam import FairseqAdamConfig
    from fairseq.optim.lr_scheduler.polynomial_decay_schedule import PolynomialDecayLRScheduleConfig
    from fairseq.tasks.masked_lm import MaskedLMConfig

    for task, dataclass in (("mlm", MaskedLMConfig), ("mlm_tlm", MlmTlmConfig)):
        cfg = compose(config_name, [f"task={task}"])
        # plain key=value (without Hydra's +) only works for keys the composed config has
        assert _fields(dataclass) <= set(cfg.task), _fields(dataclass) - set(cfg.task)
    assert _fields(XMoEEncoderConfig) <= set(cfg.model), _fields(XMoEEncoderConfig) - set(cfg.model)
    assert _fields(XMoEMaskedLmConfig) <= set(cfg.criterion)
    assert _fields(FairseqAdamConfig) <= set(cfg.optimizer)
    assert _fields(PolynomialDecayLRScheduleConfig) <= set(cfg.lr_scheduler)

    cfg = compose(config_name, [
        "model.moe_experts=64", "model.moe_freeze_router_after=1000", "task.mask_prob=0.2",
        "criterion.rf_probe_interval=500", "optimizer.adam_eps=1e-08", "lr_scheduler.power=2.0",
        "optimization.max_update=10", "checkpoint.save_dir=/ckpt",
    ])
    assert cfg.model.moe_experts == 64 and cfg.model.moe_freeze_router_after == 1000
    assert cfg.task.mask_prob == 0.2 and cfg.criterion.rf_probe_interval == 500
    assert cfg.optimizer.adam_eps == 1e-08 and cfg.lr_scheduler.power == 2.0
    assert cfg.optimization.max_update == 10 and cfg.checkpoint.save_dir == "/ckpt"


def _defaults(dataclass) -> dict:
    values = {}
    for f in dataclasses.fields(dataclass):
        if f.name == "_name":
            continue
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = "???"
        values[f.name] = value.value if isinstance(value, enum.Enum) else value
    return values


def _yaml_values(path: Path, key: str = None) -> dict:
    values = yaml.safe_load(path.read_text())
    values = values[key] if key else values
    return {k: v for k, v in values.items() if k not in ("_name", "defaults")}


@pytest.mark.parametrize(
    "path, key, dataclass",
    [
        ("model/xmoe_encoder_options.yaml", None, XMoEEncoderConfig),
        ("task/mlm_tlm.yaml", None, MlmTlmConfig),
        ("pretrain.yaml", "criterion", XMoEMaskedLmConfig),
        ("tiny_cpu.yaml", "criterion", XMoEMaskedLmConfig),
    ],
)
def test_option_lists_in_yaml_match_the_dataclass(path, key, dataclass):
    listed = _yaml_values(CONFIG_DIR / path, key)
    defaults = _defaults(dataclass)
    missing = sorted(set(defaults) - set(listed))
    assert not missing, f"add to configs/pretrain/{path}: " + ", ".join(f"{k}: {defaults[k]!r}" for k in missing)
    assert not set(listed) - set(defaults), f"{path} lists options the dataclass does not have"
    if key is None:  # the option files keep the defaults; primary configs may choose values
        differ = {k: (listed[k], defaults[k]) for k in defaults if str(listed[k]) != str(defaults[k])}
        assert not differ, f"{path}: (yaml, dataclass default) differ: {differ}"


@pytest.mark.slow
def test_fairseq_hydra_train_composes_the_groups_on_the_command_line(cli, tmp_path):
    run = cli.run([cli.bin / "fairseq-hydra-train", "--config-dir", CONFIG_DIR, "--config-name", "pretrain",
                   "task.data=/data", "model=base_paper", "gate=xmoe_sigmoid", "task=mlm_tlm",
                   "distributed=multi_gpu", "model.moe_experts=64", "--cfg", "job"], timeout=120, cwd=tmp_path)
    cli.ok(run)
    printed = run.output[run.output.index("\ncommon:") + 1:]
    cfg = OmegaConf.create(yaml.safe_load(printed))
    assert cfg.model._name == "xmoe_base_paper" and cfg.model.moe_gate_fn == "sigmoid"
    assert cfg.model.moe_experts == 64 and cfg.model.moe_expert_parallel
    assert cfg.task._name == "xmoe_mlm_tlm" and cfg.optimization.max_update == 125_000
