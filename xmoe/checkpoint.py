"""Resuming fairseq training under torch.load(weights_only=True), torch's default since 2.6.

fairseq calls torch.load without weights_only, so under torch >= 2.6 resuming fails with
"Unsupported global: GLOBAL argparse.Namespace". Rather than switching weights_only off (a
checkpoint file could then run arbitrary code), we allow-list the few plain-data classes that
fairseq pickles, found by inspecting real files with
torch.serialization.get_unsafe_globals_in_checkpoint:

- checkpoint files: argparse.Namespace (the "args" of models configured through add_args, e.g.
  fairseq's roberta; xmoe_encoder's checkpoints need nothing beyond tensors and builtins).
- multi-worker resume: rank 0 reads the file and broadcasts the state to the other ranks with
  torch.save/torch.load (fairseq.distributed.utils.broadcast_object). By then the config is an
  OmegaConf DictConfig and the tensors are replaced by placeholders, so the receivers need the
  OmegaConf container and node classes, the placeholder, and the type objects OmegaConf stores as
  metadata (typing.Any, int, list, dict, defaultdict).

Every entry is a data container whose unpickling only sets attributes: nothing on the list can
execute code. (Gathering every rank's experts into the checkpoint under expert parallelism is
xmoe.expert_checkpoint's job.)
"""

import argparse
import collections
import typing

import torch


def fairseq_checkpoint_globals() -> list:
    """The non-tensor classes that fairseq training checkpoints and their broadcast pickle."""
    from fairseq.distributed.utils import _TensorPlaceholder
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode

    checkpoint_file = [argparse.Namespace]
    distributed_broadcast = [
        _TensorPlaceholder,
        DictConfig,
        ListConfig,
        ContainerMetadata,
        Metadata,
        AnyNode,
        typing.Any,
        int,
        list,
        dict,
        collections.defaultdict,
    ]
    return checkpoint_file + distributed_broadcast


def allow_fairseq_checkpoint_globals() -> None:
    """Add fairseq_checkpoint_globals() to torch's weights_only allow-list (idempotent)."""
    torch.serialization.add_safe_globals(fairseq_checkpoint_globals())


def load_checkpoint_file(path: str) -> dict:
    """Read a fairseq checkpoint with weights_only=True (and our allow-list): no code can run."""
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    allow_fairseq_checkpoint_globals()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated file or a pickle with a global not on the list
        raise ValueError(f"cannot read checkpoint {path!r}: {error}") from error


def load_encoder(path: str):
    """(XMoEEncoder in eval mode, EncoderConfig, the checkpoint's full cfg dict) of an
    xmoe_encoder training checkpoint, with every expert (checkpoints hold all of them).

    Raises FileNotFoundError for a missing file and ValueError, saying what is wrong, for a
    file that is not an xmoe_encoder checkpoint or whose weights do not fit its config.
    """
    return encoder_from_checkpoint(load_checkpoint_file(path), path)


def encoder_from_checkpoint(state: dict, path: str):
    """load_encoder for a checkpoint already read with load_checkpoint_file (`path` names it in messages)."""
    from xmoe.encoder import XMoEEncoder
    from xmoe.models.xmoe_encoder import ARCHITECTURES, XMoEEncoderConfig, apply_architecture, encoder_config

    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ValueError(f"{path!r} is not a fairseq checkpoint (no 'model' state dict)")
    cfg = state.get("cfg") or {}
    model_cfg = dict(cfg.get("model") or {})
    if not model_cfg and state.get("args") is not None:  # checkpoints of fairseq's pre-Hydra era
        model_cfg = dict(vars(state["args"]))
    arch = model_cfg.get("_name") or model_cfg.get("arch")
    if arch not in ARCHITECTURES and arch != "xmoe_encoder":
        raise ValueError(f"checkpoint {path!r} is not an xmoe_encoder model (architecture {arch!r})")
    known = XMoEEncoderConfig.__dataclass_fields__
    fairseq_cfg = XMoEEncoderConfig(**{k: v for k, v in model_cfg.items() if k in known})
    apply_architecture(fairseq_cfg, arch if arch in ARCHITECTURES else "xmoe_base")
    weights = {k[len("encoder."):]: v for k, v in state["model"].items() if k.startswith("encoder.")}
    if "embed_tokens.weight" not in weights:
        raise ValueError(f"checkpoint {path!r} has no encoder.embed_tokens.weight: not an xmoe_encoder state dict")
    vocab_size, _ = weights["embed_tokens.weight"].shape
    padding_idx = 1  # fairseq's Dictionary always puts <pad> at index 1
    enc_cfg = encoder_config(fairseq_cfg, vocab_size, padding_idx)
    encoder = XMoEEncoder(enc_cfg)
    _check_expert_counts(path, weights, enc_cfg)
    try:
        encoder.load_state_dict(weights, strict=True)
    except RuntimeError as error:  # missing/unexpected keys or shapes: say so in one message
        raise ValueError(f"checkpoint {path!r}: the weights do not fit the model its config describes: {error}") from None
    return encoder.eval(), enc_cfg, cfg


def _check_expert_counts(path: str, weights: dict, enc_cfg) -> None:
    # A checkpoint saved by one expert-parallel rank without gathering would hold E/W experts.
    for key, tensor in weights.items():
        if ".ffn.experts." in key and tensor.shape[0] != enc_cfg.moe_experts:
            raise ValueError(
                f"checkpoint {path!r}: {key} holds {tensor.shape[0]} experts but the model has "
                f"{enc_cfg.moe_experts} per MoE layer (a shard of an expert-parallel run, not a full checkpoint?)"
            )
