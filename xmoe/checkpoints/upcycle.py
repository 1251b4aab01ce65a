"""`xmoe-upcycle DENSE_CHECKPOINT OUT_CHECKPOINT`: start an X-MoE run from a dense encoder.

Sparse upcycling (Komatsuzaki et al., 2022): in every layer that becomes an MoE layer, each
expert starts as a copy of that layer's dense FFN (optionally plus a little noise, so that the
experts can diverge); the routers start as in a freshly built model; everything else is
copied. Sources: this project's dense checkpoints (`dense_*`, or any xmoe_encoder without MoE
layers) and fairseq RoBERTa / XLM-R checkpoints (mapped by xmoe.checkpoints.roberta).

The output is an xmoe_encoder training checkpoint with the model weights only: no optimizer
state, update 0. fairseq-train continues from it with --finetune-from-model (Hydra:
checkpoint.finetune_from_model), which on the first launch resets the optimizer, the lr
schedule, the meters and the data position, and on a relaunch resumes from checkpoint_last.pt
as usual. It holds every expert, so expert-parallel training loads it on any world size like
any other checkpoint of this project (each rank takes its slice, see xmoe.expert_checkpoint).

Shape legend: E = experts per MoE layer, C = model dim, F = FFN dim.
"""

from __future__ import annotations

import argparse
import enum
import logging
import os
import shlex
import sys
import typing
from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence

import torch

EXIT_BAD_INPUT = 2
PROGRAM = "xmoe-upcycle"

# Options that define the dense network: taken from the source, never changed by upcycling.
NETWORK_OPTIONS = (
    "encoder_layers",
    "encoder_embed_dim",
    "encoder_ffn_embed_dim",
    "encoder_attention_heads",
    "max_positions",
    "num_languages",
    "scale_embedding",
    "no_layernorm_embedding",
    "encoder_normalize_before",
    "activation_fn",
    "dropout",
    "attention_dropout",
    "activation_dropout",
)
# The model's MoE layout and gate options this command takes, with the model's own names and
# help (xmoe.models.xmoe_encoder.XMoEEncoderConfig is their one source of truth).
LAYOUT_OPTIONS = ("moe_experts", "moe_freq", "moe_layers")
GATE_OPTIONS = (
    "moe_gate",
    "moe_top_k",
    "moe_routing_dim",
    "moe_gate_fn",
    "moe_no_normalize",
    "moe_capacity_factor",
    "moe_eval_capacity_factor",
    "moe_balance_temperature",
    "moe_z_loss_weight",
    "moe_second_expert_policy",
    "moe_batch_prioritized",
    "moe_renormalize_gates",
)


class UpcycleError(ValueError):
    """Bad input: the message says which file, option or tensor and what is wrong."""


@dataclass
class DenseSource:
    path: str
    kind: str  # what the file is, for messages: "xmoe_encoder dense_tiny", "fairseq roberta"
    arch: str  # the xmoe_* architecture whose MoE layout and gate are the defaults
    network: dict[str, Any]  # NETWORK_OPTIONS of the dense model
    weights: dict[str, torch.Tensor]  # state dict of the dense XMoEEncoder
    task_cfg: Optional[dict]  # the dense run's task config (this project's checkpoints only)

    @property
    def vocab_size(self) -> int:
        return self.weights["embed_tokens.weight"].shape[0]


@dataclass
class Upcycled:
    source: DenseSource
    model_cfg: Any  # XMoEEncoderConfig of the result
    arch: str  # its --arch
    moe_layers: list[int]
    out_path: str


def _xmoe_arch_for(dense_arch: Optional[str]) -> str:
    from xmoe.models.xmoe_encoder import ARCHITECTURES

    if dense_arch and dense_arch.startswith("dense_") and f"xmoe_{dense_arch[len('dense_'):]}" in ARCHITECTURES:
        return f"xmoe_{dense_arch[len('dense_'):]}"
    return dense_arch if dense_arch in ARCHITECTURES else "xmoe_base"


def _xmoe_arch_of_size(network: dict[str, Any]) -> str:
    """The xmoe_* architecture with the network's sizes (XLM-R base -> xmoe_base, large ->
    xmoe_large); xmoe_base when none has them (the sizes are then given as options)."""
    from xmoe.models.xmoe_encoder import ARCHITECTURES

    size = tuple(network[k] for k in NETWORK_OPTIONS[:4])
    for arch, preset in ARCHITECTURES.items():
        if arch.startswith("xmoe_") and arch != "xmoe_base_paper" and tuple(preset[k] for k in NETWORK_OPTIONS[:4]) == size:
            return arch
    return "xmoe_base"


def read_dense_source(path: str) -> DenseSource:
    """The dense network of a checkpoint file: this project's xmoe_encoder or fairseq's roberta."""
    from xmoe.checkpoint import encoder_from_checkpoint, load_checkpoint_file
    from xmoe.checkpoints.roberta import is_roberta_checkpoint, map_roberta

    try:
        state = load_checkpoint_file(path)
    except (FileNotFoundError, ValueError) as error:
        raise UpcycleError(str(error)) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UpcycleError(f"{path!r} is not a fairseq checkpoint (no 'model' state dict)")
    if is_roberta_checkpoint(state):
        network, weights = map_roberta(state, path)
        return DenseSource(path, "fairseq roberta", _xmoe_arch_of_size(network), network, weights, None)
    try:
        encoder, enc_cfg, cfg = encoder_from_checkpoint(state, path)
    except ValueError as error:
        raise UpcycleError(f"{error} (xmoe-upcycle reads xmoe_encoder and fairseq roberta checkpoints)") from None
    if enc_cfg.moe_layer_indices:
        raise UpcycleError(
            f"checkpoint {path!r} already has MoE layers {enc_cfg.moe_layer_indices}; upcycle a dense model "
            "(dense_* or --moe-experts 0)"
        )
    network = {name: getattr(enc_cfg, name) for name in NETWORK_OPTIONS}
    dense_arch = (cfg.get("model") or {}).get("_name")
    task_cfg = cfg.get("task")
    return DenseSource(
        path,
        f"xmoe_encoder {dense_arch}",
        _xmoe_arch_for(dense_arch),
        network,
        dict(encoder.state_dict()),
        dict(task_cfg) if task_cfg else None,
    )


def target_config(source: DenseSource, moe_options: dict[str, Any]):
    """(XMoEEncoderConfig, --arch) of the upcycled model: the source's network, the given MoE
    options, and for the rest the MoE layout and gate of the source's xmoe_* architecture."""
    from xmoe.models.xmoe_encoder import ARCHITECTURES, XMoEEncoderConfig, apply_architecture, moe_layer_indices

    cfg = XMoEEncoderConfig()
    for name, value in source.network.items():
        setattr(cfg, name, value)
    for name, value in moe_options.items():
        if value is not None:
            setattr(cfg, name, value)
    arch = source.arch
    apply_architecture(cfg, arch)
    if not cfg.moe_experts:  # --moe-experts 0: convert only, into the dense architecture
        arch = arch.replace("xmoe_", "dense_") if arch.replace("xmoe_", "dense_") in ARCHITECTURES else arch
    try:
        moe_layer_indices(cfg)
    except ValueError as error:
        raise UpcycleError(str(error)) from None
    return cfg, arch


def upcycled_weights(
    dense: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], moe_layers: list[int], num_experts: int,
    expert_noise: float, generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The state dict of the MoE encoder: `dense` everywhere, except in `moe_layers`, whose
    experts are copies of the dense FFN (plus noise) and whose routers come from `fresh`."""
    state = dict(dense)
    for i in moe_layers:
        ffn = f"layers.{i}.ffn."
        fc1_FC, fc1_F = state.pop(ffn + "fc1.weight"), state.pop(ffn + "fc1.bias")
        fc2_CF, fc2_C = state.pop(ffn + "fc2.weight"), state.pop(ffn + "fc2.bias")
        # StackedExperts computes act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]: the Linear weights transposed.
        copies = {
            "experts.w1_EDF": fc1_FC.t(),
            "experts.b1_EF": fc1_F,
            "experts.w2_EFD": fc2_CF.t(),
            "experts.b2_ED": fc2_C,
        }
        for name, tensor in copies.items():
            stacked = tensor.unsqueeze(0).repeat(num_experts, *([1] * tensor.dim())).contiguous()
            if expert_noise > 0:
                # Noise relative to the tensor's own spread: the same recipe for every size.
                scale = expert_noise * float(tensor.float().std()) if tensor.numel() > 1 else 0.0
                stacked += scale * torch.randn(stacked.shape, generator=generator, dtype=stacked.dtype)
            state[ffn + name] = stacked
        state.update({k: v for k, v in fresh.items() if k.startswith(ffn + "router.")})
    return state


def upcycle(
    source_path: str,
    out_path: str,
    moe_options: Optional[dict[str, Any]] = None,
    expert_noise: float = 0.0,
    seed: int = 1,
    force: bool = False,
) -> Upcycled:
    """Write the upcycled xmoe_encoder checkpoint of `source_path` to `out_path` (atomically)."""
    from xmoe.checkpoint import load_encoder
    from xmoe.encoder import XMoEEncoder
    from xmoe.models.xmoe_encoder import encoder_config

    if expert_noise < 0:
        raise UpcycleError(f"--expert-noise must be >= 0, got {expert_noise}")
    if os.path.exists(out_path) and not force:
        raise UpcycleError(f"{out_path!r} exists; give --force to replace it")
    if os.path.exists(out_path) and os.path.samefile(out_path, source_path):
        raise UpcycleError(f"{out_path!r} is the source checkpoint; write the result elsewhere")
    source = read_dense_source(source_path)
    cfg, arch = target_config(source, moe_options or {})
    try:
        enc_cfg = encoder_config(cfg, source.vocab_size, padding_idx=1)
        with torch.random.fork_rng(devices=[]):  # the routers' initialisation, leaving the caller's RNG alone
            torch.manual_seed(seed)
            encoder = XMoEEncoder(enc_cfg)
    except ValueError as error:
        raise UpcycleError(f"the requested MoE layout or gate is invalid: {error}") from None
    generator = torch.Generator().manual_seed(seed)
    state = upcycled_weights(
        source.weights, encoder.state_dict(), enc_cfg.moe_layer_indices, enc_cfg.moe_experts, expert_noise, generator
    )
    encoder.load_state_dict(state, strict=True)

    checkpoint = {
        "args": None,
        "cfg": {"model": dict(_plain(cfg), _name=arch), **({"task": source.task_cfg} if source.task_cfg else {})},
        # XMoEEncoderModel's parameters are its `encoder`'s
        "model": {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
        "optimizer_history": [
            {"criterion_name": "XMoEMaskedLmLoss", "optimizer_name": "none", "lr_scheduler_state": {}, "num_updates": 0}
        ],
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0, "version": 2}},
        "upcycled_from": {
            "path": os.path.abspath(source_path),
            "kind": source.kind,
            "moe_layers": list(enc_cfg.moe_layer_indices),
            "experts": enc_cfg.moe_experts,
            "expert_noise": expert_noise,
            "seed": seed,
        },
    }
    _save_atomically(checkpoint, out_path)
    load_encoder(out_path)  # reads back the safe way (weights_only + allow-list), or raises
    return Upcycled(source, cfg, arch, list(enc_cfg.moe_layer_indices), out_path)


def _plain(cfg) -> dict[str, Any]:
    # Enum members (fairseq's ChoiceEnum) as their strings: weights_only loading refuses enums.
    return {f.name: (v.value if isinstance(v := getattr(cfg, f.name), enum.Enum) else v) for f in fields(cfg)}


def _save_atomically(checkpoint: dict, out_path: str) -> None:
    folder = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    tmp_path = f"{out_path}.tmp-{os.getpid()}"
    try:
        torch.save(checkpoint, tmp_path)
        os.replace(tmp_path, out_path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


# ---- how to continue training --------------------------------------------------------------
def changed_options(result: Upcycled) -> list[tuple[str, Any]]:
    """(option, value) the training command must set beyond --arch for the checkpoint to fit."""
    from xmoe.models.xmoe_encoder import XMoEEncoderConfig, apply_architecture, moe_layer_indices

    preset = XMoEEncoderConfig()
    apply_architecture(preset, result.arch)
    plain, preset_plain = _plain(result.model_cfg), _plain(preset)
    changed = [
        (name, plain[name])
        for name in NETWORK_OPTIONS + ("moe_experts",) + GATE_OPTIONS
        if str(plain[name]) != str(preset_plain[name])
    ]
    if moe_layer_indices(result.model_cfg) != moe_layer_indices(preset):
        changed.append(("moe_layers", ",".join(map(str, moe_layer_indices(result.model_cfg)))))
    return changed


def _cli_option(name: str, value: Any) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag] if value else []
    return [flag, shlex.quote(str(value))]


def _hydra_override(name: str, value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, str):
        text = f'"{value}"'  # quoted: Hydra would read a bare 1,3 as a sweep over two values
    else:
        text = str(value)
    return shlex.quote(f"model.{name}={text}")


def continue_commands(result: Upcycled) -> list[str]:
    """The fairseq-train and scripts/pretrain.sh command lines that continue from the result."""
    out = shlex.quote(os.path.abspath(result.out_path))
    changed = changed_options(result)
    cli_options = [part for name, value in changed for part in _cli_option(name, value)]
    hydra_options = [_hydra_override(name, value) for name, value in changed]
    preset = result.arch[len("xmoe_"):] if result.arch.startswith("xmoe_") else result.arch
    # the dense run's task when it is known (this project's checkpoints), else the cross-lingual one
    task = (result.source.task_cfg or {}).get("_name") or "xmoe_mlm_tlm"
    task_group = {"masked_lm": "mlm", "xmoe_mlm_tlm": "mlm_tlm"}.get(task)
    return [
        " ".join(
            [f"fairseq-train DATA --user-dir xmoe --task {task} --criterion xmoe_masked_lm --arch {result.arch}"]
            + cli_options
            + [f"--finetune-from-model {out}", "..."]
        ),
        " ".join(
            ["scripts/pretrain.sh task.data=DATA", f"model={preset}"]
            + ([f"task={task_group}"] if task_group else [])
            + hydra_options
            + [f"checkpoint.finetune_from_model={out}"]
        ),
    ]


# ---- command line ----------------------------------------------------------------------------
def _add_model_option(parser: argparse.ArgumentParser, name: str) -> None:
    """An option of the xmoe_encoder model, with its name, type, choices and help."""
    from xmoe.models.xmoe_encoder import XMoEEncoderConfig

    field = XMoEEncoderConfig.__dataclass_fields__[name]
    help_text = field.metadata.get("help", "")
    if "unset:" not in help_text:
        help_text += f" (default: the model's, {field.default})"
    flag = "--" + name.replace("_", "-")
    kind = field.type
    if isinstance(kind, str):  # postponed annotations
        kind = typing.get_type_hints(XMoEEncoderConfig)[name]
    if kind is bool:
        parser.add_argument(flag, action="store_true", default=None, help=help_text)
        return
    if isinstance(kind, type) and issubclass(kind, enum.Enum):  # fairseq's ChoiceEnum
        parser.add_argument(flag, choices=[c.value for c in kind], default=None, help=help_text)
        return
    inner = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
    parser.add_argument(flag, type=inner[0], default=None, metavar=inner[0].__name__.upper(), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Sparse upcycling: write an xmoe_encoder training checkpoint (update 0, model weights "
        "only) whose MoE layers start with every expert a copy of the dense FFN of that layer. The dense "
        "source is this project's checkpoint (dense_* or any xmoe_encoder without MoE layers) or a fairseq "
        "RoBERTa / XLM-R checkpoint. Prints the training commands that continue from the result.",
        epilog="example: xmoe-upcycle work-dirs/dense/checkpoints/checkpoint_last.pt upcycled.pt --expert-noise 0.01",
    )
    parser.add_argument("dense_checkpoint", metavar="DENSE_CHECKPOINT", help="the dense model's fairseq checkpoint")
    parser.add_argument("out_checkpoint", metavar="OUT_CHECKPOINT", help="the xmoe_encoder checkpoint to write")
    layout = parser.add_argument_group(
        "MoE layout (default: that of the xmoe_* architecture of the dense model's size, e.g. dense_tiny -> "
        "xmoe_tiny; 32 experts in every 2nd layer when no architecture has its size)"
    )
    for name in LAYOUT_OPTIONS:
        _add_model_option(layout, name)
    gate = parser.add_argument_group("gate (default: the model's defaults, the X-MoE softmax gate)")
    for name in GATE_OPTIONS:
        _add_model_option(gate, name)
    parser.add_argument(
        "--expert-noise",
        type=float,
        default=0.0,
        metavar="S",
        help="add Gaussian noise to every expert copy, with standard deviation S times that of the dense "
        "tensor it copies (independently per expert), so that experts can diverge; 0 = exact copies",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the routers' initialisation and of the noise")
    parser.add_argument("--force", action="store_true", help="replace OUT_CHECKPOINT if it exists")
    update0 = parser.add_argument_group("the MLM loss at update 0 (with --data)")
    update0.add_argument(
        "--data",
        metavar="DATA_DIR",
        help="binarized data in the dense model's dictionary (data-prep's layout or fairseq-preprocess's): "
        "print the masked-LM loss of the dense model, of the upcycled model, and of the upcycled model with "
        "renormalized gates and no capacity limit, on the same masked batches of --valid-subset",
    )
    update0.add_argument("--valid-subset", default="valid", help="the split to evaluate (default: valid)")
    update0.add_argument(
        "--max-sentences", type=int, default=256, metavar="N", help="evaluate the first N samples (default: 256)"
    )
    return parser


def report_update0(result: Upcycled, data: str, split: str, max_sentences: int) -> list[str]:
    """Lines comparing the MLM loss at update 0 of the dense and the upcycled model."""
    from xmoe.checkpoint import load_encoder
    from xmoe.checkpoints.mlm_loss import build_task, masked_lm_losses

    upcycled, enc_cfg, _ = load_encoder(result.out_path)
    dense = _dense_encoder(result.source)
    function_preserving, _, _ = load_encoder(result.out_path)
    for layer in function_preserving.moe_layers():
        layer.renormalize_gates = True
        layer.capacity_factor = layer.eval_capacity_factor = 0.0  # dropless
    task = build_task(data, result.source.task_cfg, enc_cfg.max_positions)
    vocabulary = len(task.source_dictionary)
    if vocabulary != result.source.vocab_size:
        raise UpcycleError(
            f"--data {data!r}: its dictionary (with <mask>) has {vocabulary} entries, the model "
            f"{result.source.vocab_size}: binarize with the dense model's dictionary"
        )
    encoders = {"dense": dense, "upcycled": upcycled, "function-preserving": function_preserving}
    losses = masked_lm_losses(encoders, task, split, max_sentences)
    moe = losses["upcycled"]
    lines = [
        f"MLM loss at update 0 on {data} {split} ({moe.masked_tokens} masked tokens, bits per token as fairseq logs it):",
        f"  dense model                                     {losses['dense'].loss:.4f}",
        f"  upcycled                                        {moe.loss:.4f}"
        + (
            f"  (mean gate of the chosen expert {moe.top_gate_mean:.3f}, {100 * moe.dropped_fraction:.1f}% of "
            "tokens past capacity)"
            if moe.top_gate_mean is not None
            else ""
        ),
        f"  upcycled, renormalized gates, no capacity limit {losses['function-preserving'].loss:.4f}",
    ]
    return lines


def _dense_encoder(source: DenseSource):
    from xmoe.encoder import XMoEEncoder
    from xmoe.models.xmoe_encoder import XMoEEncoderConfig, encoder_config

    cfg = XMoEEncoderConfig()
    for name, value in source.network.items():
        setattr(cfg, name, value)
    cfg.moe_experts = 0
    encoder = XMoEEncoder(encoder_config(cfg, source.vocab_size, padding_idx=1))
    encoder.load_state_dict(source.weights, strict=True)
    return encoder.eval()


def main(argv: Optional[Sequence[str]] = None) -> int:
    from xmoe.checkpoints.roberta import RobertaMappingError

    # Warnings and errors only; the root handler must exist before fairseq's import-time
    # logging.basicConfig(level=DEBUG/INFO) calls (building the parser imports fairseq).
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    moe_options = {name: getattr(args, name) for name in LAYOUT_OPTIONS + GATE_OPTIONS}
    try:
        result = upcycle(args.dense_checkpoint, args.out_checkpoint, moe_options, args.expert_noise, args.seed, args.force)
    except (UpcycleError, RobertaMappingError) as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    cfg = result.model_cfg
    if result.moe_layers:
        print(
            f"{PROGRAM}: {result.source.kind} {result.source.path} -> {result.arch}: {cfg.moe_experts} experts "
            f"(copies of the dense FFN, noise {args.expert_noise}) in layers {result.moe_layers}, "
            f"gate {cfg.moe_gate}/{cfg.moe_gate_fn} top-{cfg.moe_top_k}, routers initialised fresh (seed {args.seed})"
        )
    else:
        print(f"{PROGRAM}: {result.source.kind} {result.source.path} -> {result.arch} (no MoE layer: converted only)")
    print(f"{PROGRAM}: wrote {result.out_path}: update 0, no optimizer state, vocabulary of {result.source.vocab_size}")
    print(
        "continue training from it (DATA binarized with the dense model's dictionary; on the first launch the "
        "optimizer, lr schedule, meters and data position start fresh, a relaunch resumes from checkpoint_last.pt):"
    )
    for line in continue_commands(result):
        print(f"  {line}")
    if args.data:
        try:
            for line in report_update0(result, args.data, args.valid_subset, args.max_sentences):
                print(line)
        except (UpcycleError, ValueError, FileNotFoundError) as error:  # the checkpoint is written; say why no loss
            print(f"{PROGRAM}: error: cannot evaluate --data: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
