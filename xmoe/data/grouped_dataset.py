"""Named groups of samples, masked on the fly and batched so that a batch never mixes groups.

Shape letters: B = samples in a batch, T = longest sample in the batch.

Training uses two groups, "mlm" and "tlm", interleaved at a batch ratio;
validation uses one group per language and per pair, one after the other, so
the task can report a loss for each.
"""

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from fairseq.data import FairseqDataset, data_utils

from xmoe.data.batching import Batches, batches_by_size, interleave_streams
from xmoe.data.masking import TokenMasker

logger = logging.getLogger(__name__)


class GroupedMaskedDataset(FairseqDataset):
    """Concatenates named groups of unmasked samples and masks them when fetched.

    Group items are dicts with "tokens", "langs", "positions" (1-D long tensors of
    one length). Indices are "virtual": index v stands for item v % len(self) on
    pass v // len(self), so a group that must be repeated within an epoch (to keep
    the interleaving ratio) gets fresh masks on each pass. The mask of index v is
    drawn from a generator seeded with (seed, epoch, v): reproducible, and new
    every epoch.
    """

    def __init__(
        self,
        groups: Sequence[Tuple[str, FairseqDataset]],
        masker: TokenMasker,
        pad_idx: int,
        seed: int,
        batch_ratio: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        if batch_ratio is not None and len(batch_ratio) != len(groups):
            raise ValueError(f"{len(groups)} groups but batch ratio {list(batch_ratio)}")
        self.group_names: List[str] = [name for name, _ in groups]
        self.groups: List[FairseqDataset] = [dataset for _, dataset in groups]
        self.masker = masker
        self.pad_idx = pad_idx
        self.seed = seed
        # None: every group once, group after group (validation); else batches per cycle
        self.batch_ratio = None if batch_ratio is None else list(batch_ratio)
        # group g holds the indices offsets[g] .. offsets[g+1]-1
        self.offsets = np.cumsum([0] + [len(d) for d in self.groups])
        self.epoch = 1

    # ---- item access -------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> Tuple[int, int]:
        """virtual index -> (group, index inside the group)."""
        base = index % len(self)
        group = int(np.searchsorted(self.offsets, base, side="right")) - 1
        return group, base - int(self.offsets[group])

    def __getitem__(self, index: int) -> Dict[str, Any]:
        group, local = self._locate(index)
        item = self.groups[group][local]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        source, target = self.masker(item["tokens"], rng)
        return {
            "id": index,
            "group": group,
            "source": source,
            "target": target,
            "langs": item["langs"],
            "positions": item["positions"],
        }

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        if len(samples) == 0:
            return {}
        groups = {s["group"] for s in samples}
        if len(groups) != 1:
            raise RuntimeError(f"a batch mixes groups {sorted(groups)}; batches must be per group")

        def pad(key: str, value: int) -> torch.Tensor:
            return data_utils.collate_tokens([s[key] for s in samples], value)  # (B, T)

        src_tokens = pad("source", self.pad_idx)
        src_lengths = torch.tensor([len(s["source"]) for s in samples], dtype=torch.long)  # (B,)
        return {
            "id": torch.tensor([s["id"] for s in samples], dtype=torch.long),
            "nsentences": len(samples),
            "ntokens": int(src_lengths.sum()),
            "net_input": {
                "src_tokens": src_tokens,
                "src_lengths": src_lengths,
                # padding positions are ignored by the model; 0 is just a valid filler id
                "src_langs": pad("langs", 0),
                "src_positions": pad("positions", 0),
            },
            "target": pad("target", self.pad_idx),
            "group": self.group_names[groups.pop()],
        }

    # ---- sizes, epochs -----------------------------------------------------------

    @property
    def sizes(self) -> np.ndarray:
        return np.concatenate([np.asarray(d.sizes, dtype=np.int64) for d in self.groups])

    def num_tokens(self, index: int) -> int:
        group, local = self._locate(index)
        return self.groups[group].num_tokens(local)

    def size(self, index: int) -> int:
        group, local = self._locate(index)
        return self.groups[group].size(local)

    def ordered_indices(self) -> np.ndarray:
        return np.argsort(self.sizes, kind="stable")

    @property
    def can_reuse_epoch_itr_across_epochs(self) -> bool:
        return False  # resampling and masks change every epoch

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.epoch = epoch
        for dataset in self.groups:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)

    # ---- batches -----------------------------------------------------------------

    def make_batches(
        self,
        seed: int,
        max_tokens: Optional[int],
        max_sentences: Optional[int],
        max_positions: Optional[Union[int, Sequence[Optional[int]]]] = None,
        ignore_invalid_inputs: bool = False,
        required_batch_size_multiple: int = 1,
        num_shards: int = 1,
        exclude: Optional[np.ndarray] = None,
    ) -> Batches:
        """All batches of the current epoch, in the order fairseq should serve them.

        Call `set_epoch` first. With a batch ratio the groups are interleaved in
        slots of `num_shards` batches (one per worker); without, every sample of every
        group is batched once, group after group. `exclude` holds virtual indices the
        epoch has already trained on (a resumed epoch): they are left out of every pass.
        """
        if self.batch_ratio is None:
            # NOTE: fairseq's batch_by_size drops a last batch whose size is not a multiple of
            # required_batch_size_multiple (default 8); per group, that could drop a whole small
            # language from validation, so evaluation batches take any size.
            required_batch_size_multiple = 1
        # a sample longer than max_tokens could never be batched: treat it like a too-long one
        limit = size_limit((size_limit(max_positions), max_tokens))
        streams = []
        for g, dataset in enumerate(self.groups):
            sizes = np.asarray(dataset.sizes, dtype=np.int64)  # (N_g,)
            too_long = sizes > limit if limit is not None else np.zeros(len(sizes), bool)
            if too_long.any():
                message = (
                    f"{int(too_long.sum())} samples of group '{self.group_names[g]}' are longer "
                    f"than {limit} tokens (the largest has {int(sizes.max())})"
                )
                if not ignore_invalid_inputs:
                    raise ValueError(
                        f"{message}; lower --tokens-per-sample, or raise --max-tokens or the "
                        "model's max positions"
                    )
                logger.warning(f"skipping {message}")
            kept = np.flatnonzero(~too_long)  # (N_kept,) local indices
            if len(kept) == 0 and self.batch_ratio is not None and self.batch_ratio[g] > 0:
                raise ValueError(
                    f"group '{self.group_names[g]}' has no sample of at most {limit} tokens"
                )
            streams.append(
                self._group_passes(
                    g, sizes[kept], kept, seed, max_tokens, max_sentences,
                    required_batch_size_multiple, exclude,
                )
            )
        if self.batch_ratio is None:
            return [batch for passes in streams for batch in passes(0)]
        return interleave_streams(streams, self.batch_ratio, slot_size=num_shards)

    def _group_passes(self, group, sizes, kept, seed, max_tokens, max_sentences, multiple, exclude):
        """Function pass -> batches of virtual indices for one group."""
        offset, total = int(self.offsets[group]), len(self)

        def batches_of_pass(pass_idx: int) -> Batches:
            virtual = offset + kept + pass_idx * total  # (N_kept,)
            left = np.ones(len(virtual), bool) if exclude is None else ~np.isin(virtual, exclude)
            if not left.any():
                return []
            rng = np.random.default_rng([seed, self.epoch, group, pass_idx])
            local = batches_by_size(sizes[left], rng, max_tokens, max_sentences, multiple)
            return [virtual[left][b] for b in local]

        return batches_of_pass


def size_limit(max_positions: Optional[Union[int, Sequence[Optional[int]]]]) -> Optional[int]:
    """fairseq passes max positions as an int, None, or a tuple of those: take the tightest."""
    if max_positions is None:
        return None
    if isinstance(max_positions, (int, float)):
        return int(max_positions)
    limits = [int(m) for m in max_positions if m is not None]
    return min(limits) if limits else None
