"""xmoe.checkpoint: fairseq checkpoints load under weights_only, and nothing else is let in."""

import argparse
import collections
import io
import pickle

import fairseq  # noqa: F401
import pytest
import torch
from fairseq.distributed.utils import _split_tensors_from_obj
from omegaconf import OmegaConf

from xmoe.checkpoint import allow_fairseq_checkpoint_globals


class NotAllowListed:
    pass


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_legacy_checkpoint_args_namespace_loads_with_weights_only():
    allow_fairseq_checkpoint_globals()
    state = {"args": argparse.Namespace(arch="roberta", lr=[0.1]), "model": {"w": torch.ones(2)}}
    loaded = roundtrip(state)
    assert loaded["args"].arch == "roberta" and torch.equal(loaded["model"]["w"], torch.ones(2))


def test_state_broadcast_to_other_workers_loads_with_weights_only():
    # What fairseq's broadcast_object pickles when rank 0 shares a loaded checkpoint.
    allow_fairseq_checkpoint_globals()
    cfg = OmegaConf.create({"model": {"_name": "xmoe_tiny", "moe_layers": "", "lr": [0.1]}},
                           flags={"allow_objects": True})
    state = {"cfg": cfg, "model": {"w": torch.ones(2)}, "meters": collections.defaultdict(int)}
    tensors = []
    loaded = roundtrip(_split_tensors_from_obj(state, tensors))
    assert loaded["cfg"].model._name == "xmoe_tiny" and loaded["cfg"].model.lr == [0.1]
    assert len(tensors) == 1 and loaded["model"]["w"].index == 0


def test_other_classes_are_still_refused():
    allow_fairseq_checkpoint_globals()
    with pytest.raises(pickle.UnpicklingError, match="NotAllowListed"):
        roundtrip({"evil": NotAllowListed()})
