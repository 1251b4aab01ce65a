"""Expert-aware, atomic fairseq checkpoints.

fairseq writes checkpoints from rank 0 only. Under expert parallelism rank 0 holds just its own
slice of every MoE layer's experts (and of their Adam moments), so a plain fairseq checkpoint
silently loses the other ranks' experts. This module makes every checkpoint hold ALL experts:

- save: every rank takes part in `Trainer.state_dict()` (fairseq already calls it on all ranks
  when `always_call_state_dict_during_save_checkpoint` is true, which we switch on under expert
  parallelism); the expert parameters and their optimizer state are all-gathered over the
  expert-parallel group into full (E, ...) tensors, and rank 0 writes them.
- load: every rank receives the full tensors (fairseq broadcasts the checkpoint) and keeps its
  slice: `MoELayer` does it for parameters (a load_state_dict pre-hook) and
  `slice_expert_optimizer_state` for the optimizer state. So a checkpoint written by W ranks
  resumes on any W' that divides (or is a multiple of) the number of experts.
- atomic copies: fairseq saves atomically (write *.tmp, rename) but then COPIES that file to
  checkpoint_last.pt in place; a kill during the copy leaves a truncated checkpoint_last.pt.
  Copies to local files go through a temporary file and os.replace instead (also when iopath
  is installed: fairseq then routes copies through iopath, which copies in place too).
- a stable optimizer parameter list: fairseq builds its optimizer over the parameters that
  require gradients, and rebuilds it when it resumes. A parameter frozen mid-training (the
  router under --moe-freeze-router-after) was in the optimizer of the run that froze it, so it
  must be in the resumed run's optimizer too, or the saved optimizer state no longer lines up.
  Parameters marked with `keep_in_optimizer` are always included (Adam skips them while their
  gradient is None). fairseq's FP16Optimizer (--fp16/--bf16 without --memory-efficient-*) keeps
  flat fp32 copies that a mid-training freeze would misalign, so that combination is refused.

`install()` applies these changes to fairseq's classes; it runs when the plugin is imported.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from itertools import chain

import torch
from torch import nn

from xmoe.moe import MoELayer
from xmoe.moe.parallel import gather_expert_shards

_INSTALLED = False
# Parameter attribute: a schedule may freeze it mid-training; it stays in every optimizer fairseq builds.
KEEP_IN_OPTIMIZER = "keep_in_optimizer"


def keep_in_optimizer(params: Iterable[nn.Parameter]) -> None:
    """Mark parameters that will be frozen during training (requires_grad cleared at some update),
    so that an optimizer built after they froze (on resume) lists them as the first one did."""
    for param in params:
        setattr(param, KEEP_IN_OPTIMIZER, True)


def sharded_moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """(module name, layer) of every MoE layer whose experts are split over ranks."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, MoELayer) and module.num_local_experts < module.num_experts
    ]


def expert_parallel_group_of(model: nn.Module):
    """The single expert-parallel group the model's MoE layers share (None if not sharded)."""
    groups = {id(layer.process_group): layer.process_group for _, layer in sharded_moe_layers(model)}
    if len(groups) > 1:
        raise ValueError("expert-parallel checkpoints need every MoE layer to use the same process group")
    return next(iter(groups.values()), None)


def gather_expert_model_state(model: nn.Module, model_state: dict) -> None:
    """Replace each local expert tensor in `model_state` by the full (E, ...) tensor. Collective."""
    for name, layer in sharded_moe_layers(model):
        for param_name, full in layer.full_expert_state_dict().items():
            key = f"{name}.experts.{param_name}" if name else f"experts.{param_name}"
            if key not in model_state:
                raise KeyError(f"expert parameter {key!r} is missing from the model state dict")
            model_state[key] = full


def _optimizer_params(torch_optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    # torch numbers optimizer state by position over all param groups, in order.
    return [param for group in torch_optimizer.param_groups for param in group["params"]]


def _expert_slices(torch_optimizer: torch.optim.Optimizer) -> dict[int, tuple[int, int, int]]:
    """{state index: (first expert, local experts, total experts)} for sharded expert params."""
    slices = {}
    for index, param in enumerate(_optimizer_params(torch_optimizer)):
        layout = getattr(param, "expert_slice", None)
        if layout is None and getattr(param, "expert", False):
            raise ValueError(
                "an expert parameter in the optimizer has no expert layout (fairseq's FP16Optimizer "
                "copies parameters); with expert parallelism use --memory-efficient-fp16/-bf16 or fp32"
            )
        if layout is not None and layout[1] < layout[2]:
            slices[index] = layout
    return slices


def gather_expert_optimizer_state(torch_optimizer: torch.optim.Optimizer, optimizer_state: dict, ep_group) -> None:
    """All-gather the per-expert optimizer state tensors (Adam moments) into full tensors. Collective."""
    for index, (_, local, _) in sorted(_expert_slices(torch_optimizer).items()):
        param_state = optimizer_state["state"].get(index)
        if param_state is None:
            continue
        # NOTE: torch's Optimizer.state_dict() hands out the live per-parameter state dicts, so
        # the gathered tensors go into a copy; writing them into param_state would give the
        # running optimizer (E, ...) moments for its (L, ...) experts after every checkpoint.
        gathered = dict(param_state)
        for key in sorted(param_state):
            value = param_state[key]
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == local:
                gathered[key] = gather_expert_shards(value, ep_group)
        optimizer_state["state"][index] = gathered


def slice_expert_optimizer_state(torch_optimizer: torch.optim.Optimizer, optimizer_state: dict) -> None:
    """Keep this rank's slice of full (E, ...) optimizer state tensors (in place)."""
    for index, (first, local, total) in _expert_slices(torch_optimizer).items():
        param_state = optimizer_state.get("state", {}).get(index, {})
        for key, value in list(param_state.items()):
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == total:
                param_state[key] = value[first : first + local].clone()


def uses_flat_fp16_optimizer(common_cfg, is_fsdp: bool) -> bool:
    """Whether fairseq's Trainer builds its FP16Optimizer (fp32 copies of the parameters) for
    these --fp16/--bf16/--memory-efficient-*/--amp settings, as Trainer._build_optimizer decides."""
    half = common_cfg.fp16 or common_cfg.bf16
    memory_efficient = common_cfg.memory_efficient_fp16 or common_cfg.memory_efficient_bf16
    return bool(half and not memory_efficient and not common_cfg.amp and not (is_fsdp and common_cfg.fp16))


def atomic_copy(src_path: str, dst_path: str) -> None:
    """Copy through a temporary file in the destination folder, then rename over the target."""
    tmp_path = f"{dst_path}.tmp-copy"
    shutil.copyfile(src_path, tmp_path)
    with open(tmp_path, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp_path, dst_path)


def install() -> None:
    """Patch fairseq's Trainer, FairseqOptimizer and PathManager (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from fairseq import file_io
    from fairseq.optim.fairseq_optimizer import FairseqOptimizer
    from fairseq.trainer import Trainer

    original_build_optimizer = Trainer._build_optimizer
    original_state_dict = Trainer.state_dict
    original_always_call = Trainer.always_call_state_dict_during_save_checkpoint
    original_load_optimizer = FairseqOptimizer.load_state_dict
    original_copy = file_io.PathManager.copy

    def state_dict(self):
        state = original_state_dict(self)
        model = self.get_model()
        ep_group = expert_parallel_group_of(model)
        if ep_group is not None:
            gather_expert_model_state(model, state["model"])
            if "last_optimizer_state" in state:
                gather_expert_optimizer_state(self.optimizer.optimizer, state["last_optimizer_state"], ep_group)
        return state

    def always_call_state_dict(self) -> bool:
        return original_always_call.fget(self) or expert_parallel_group_of(self.get_model()) is not None

    def load_optimizer_state_dict(self, state_dict, optimizer_overrides=None):
        slice_expert_optimizer_state(self.optimizer, state_dict)
        return original_load_optimizer(self, state_dict, optimizer_overrides)

    def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        remote = file_io.PathManager.path_requires_pathmanager(dst_path)
        if remote or not os.path.isfile(src_path):
            return original_copy(src_path, dst_path, overwrite)
        atomic_copy(src_path, dst_path)
        return True

    def build_optimizer(self) -> None:
        params = list(chain(self.model.parameters(), self.criterion.parameters()))
        marked = [param for param in params if getattr(param, KEEP_IN_OPTIMIZER, False)]
        if marked and uses_flat_fp16_optimizer(self.cfg.common, self.is_fsdp):
            raise ValueError(
                "freezing parameters mid-training (--moe-freeze-router-after) does not work with "
                "fairseq's FP16Optimizer (--fp16/--bf16 alone): add --memory-efficient-fp16 or "
                "--memory-efficient-bf16, or train in fp32 or with --amp"
            )
        scheduled = [param for param in marked if not param.requires_grad]
        for param in scheduled:  # fairseq keeps parameters that require grad: let these pass
            param.requires_grad_(True)
        try:
            original_build_optimizer(self)
        finally:
            for param in scheduled:
                param.requires_grad_(False)

    Trainer._build_optimizer = build_optimizer
    Trainer.state_dict = state_dict
    Trainer.always_call_state_dict_during_save_checkpoint = property(always_call_state_dict)
    FairseqOptimizer.load_state_dict = load_optimizer_state_dict
    file_io.PathManager.copy = staticmethod(copy)
    _INSTALLED = True
