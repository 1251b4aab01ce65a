"""fairseq's epoch iterator, with the position in the epoch kept as the samples already trained on.

fairseq records how far an epoch got as `iterations_in_epoch`: batches of ONE worker. Resumed
on another number of workers or another batch size, that count points somewhere else in a
differently cut stream, and training re-reads or skips data. Here the checkpoint also holds
the epoch's global position: for each earlier run of this epoch, the batching it used (seed,
batch size, token budget, number of workers, ...) and how many of its global batches were
trained. Batches are a pure function of those and of (seed, epoch), so on load the samples
already trained on are recomputed, and a run with another batching batches only the rest.
update_freq needs nothing: checkpoints fall on update boundaries, where every worker has
consumed the same number of batches.

A global batch i goes to worker i % W (fairseq's ShardedIterator), so when every worker has
taken n batches, global batches 0 .. n*W-1 are the ones trained on.
"""

import logging
from typing import Any, Dict, List, Optional

import numpy as np
from fairseq.data import iterators

logger = logging.getLogger(__name__)

# key of the global position inside fairseq's "train_iterator" checkpoint state
POSITION_KEY = "xmoe_position"
POSITION_VERSION = 1


class ElasticEpochBatchIterator(iterators.EpochBatchIterator):
    """EpochBatchIterator over a GroupedMaskedDataset whose state survives a change of workers.

    `batching` holds every keyword argument of `dataset.make_batches` but `exclude`;
    `describe` turns one into words for the log line ("2 workers x batch size 8").
    """

    def __init__(
        self,
        dataset,
        batching: Dict[str, Any],
        num_shards: int,
        shard_id: int,
        epoch: int,
        log_prefix: str,
        **kwargs,
    ):
        self.batching = dict(batching)
        self.log_prefix = log_prefix
        # the epoch that was resumed, its earlier runs and the virtual indices they trained on
        self._resumed_epoch: Optional[int] = None
        self._earlier_runs: List[Dict[str, Any]] = []
        self._trained_before = np.zeros(0, dtype=np.int64)
        super().__init__(
            dataset=dataset,
            collate_fn=dataset.collater,
            batch_sampler=self._batches_for_epoch,
            num_shards=num_shards,
            shard_id=shard_id,
            epoch=epoch,
            **kwargs,
        )

    # ---- batches ---------------------------------------------------------------------

    def _batches_for_epoch(self, dataset, epoch: int) -> List[np.ndarray]:
        dataset.set_epoch(epoch)
        exclude = self._trained_before if epoch == self._resumed_epoch else None
        return dataset.make_batches(**self.batching, exclude=exclude)

    def _earlier(self):
        """(earlier runs, samples they trained on) of the current epoch: none unless resumed."""
        if self.epoch != self._resumed_epoch:
            return [], 0
        return self._earlier_runs, len(self._trained_before)

    def _replay(self, runs: List[Dict[str, Any]]) -> Optional[np.ndarray]:
        """Virtual indices trained on by `runs` (in order, each batching what the earlier ones
        left); None when a run claims more batches than its batching gives (other data)."""
        self.dataset.set_epoch(self.epoch)
        trained = np.zeros(0, dtype=np.int64)
        for run in runs:
            batches = self.dataset.make_batches(**run["batching"], exclude=trained)
            if run["batches"] > len(batches):
                return None
            trained = np.concatenate([trained] + [np.asarray(b, np.int64) for b in batches[: run["batches"]]])
        return trained

    # ---- checkpoint state ------------------------------------------------------------

    def _fingerprint(self) -> Dict[str, int]:
        """Samples per group of the current epoch: the replay is only valid on the same ones."""
        sizes = np.diff(self.dataset.offsets)
        return {name: int(size) for name, size in zip(self.dataset.group_names, sizes)}

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        if state["iterations_in_epoch"] > 0:
            earlier_runs, trained_before = self._earlier()
            consumed = min(self.iterations_in_epoch * self.num_shards, len(self.frozen_batches))
            trained = trained_before + sum(len(b) for b in self.frozen_batches[:consumed])
            state[POSITION_KEY] = {
                "version": POSITION_VERSION,
                "epoch": state["epoch"],
                "groups": self._fingerprint(),
                "samples_trained": int(trained),
                "runs": earlier_runs + [{"batching": dict(self.batching), "batches": int(consumed)}],
            }
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        position = state_dict.get(POSITION_KEY)
        if state_dict.get("iterations_in_epoch", 0) == 0:
            return super().load_state_dict(state_dict)  # at an epoch boundary: nothing to convert
        epoch = state_dict["epoch"]
        if position is None:
            logger.warning(
                f"{self.log_prefix}: the checkpoint records no global data position (written before "
                f"xmoe kept one); resuming at batch {state_dict['iterations_in_epoch']} of each "
                "worker as fairseq does, which repeats or skips data unless the number of workers "
                "and the batch size are those of the run that wrote it"
            )
            return super().load_state_dict(state_dict)
        self.epoch = epoch
        runs, fingerprint = position["runs"], self._fingerprint()
        trained = self._replay(runs) if position.get("groups") == fingerprint else None
        if trained is None:
            logger.warning(
                f"{self.log_prefix}: epoch {epoch} cannot continue where it stopped: its samples "
                f"changed since the checkpoint (groups {position.get('groups')}, now {fingerprint}: "
                "other data, --tokens-per-sample, languages, sampling or seed); epoch "
                f"{epoch} starts again from its first batch, repeating the "
                f"{position.get('samples_trained', 'unknown number of')} samples trained before"
            )
            self._next_epoch_itr = None
            return
        continue_last = runs[-1]["batching"] == self.batching
        self._earlier_runs = [dict(r) for r in (runs[:-1] if continue_last else runs)]
        self._trained_before = self._replay(self._earlier_runs) if continue_last else trained
        self._resumed_epoch = epoch
        self._frozen_batches = None  # the batches of the full epoch were made before this call
        offset = runs[-1]["batches"] // self.num_shards if continue_last else 0
        left = len(self.frozen_batches) - offset * self.num_shards
        if left <= 0:
            logger.info(f"{self.log_prefix}: epoch {epoch} had no sample left to train on")
            self.epoch += 1
            self._next_epoch_itr = None
            return
        self._next_epoch_itr = self._get_iterator_for_epoch(self.epoch, shuffle=False, offset=offset)
        if continue_last:
            how = f"at global batch {runs[-1]['batches']} ({offset} per worker), batched as before"
        else:
            how = f"with the samples not yet seen, batched for {self.describe(self.batching)}"
        history = "; ".join(f"{r['batches']} global batches of {self.describe(r['batching'])}" for r in runs)
        logger.info(
            f"{self.log_prefix}: epoch {epoch} resumes after {len(trained)} of its samples "
            f"({history}) {how}"
        )

    @staticmethod
    def describe(batching: Dict[str, Any]) -> str:
        workers = batching.get("num_shards", 1)
        parts = [f"{workers} worker{'s' if workers != 1 else ''}"]
        if batching.get("max_sentences"):
            parts.append(f"batch size {batching['max_sentences']}")
        if batching.get("max_tokens"):
            parts.append(f"max tokens {batching['max_tokens']}")
        return " x ".join(parts)
