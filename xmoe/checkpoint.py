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
