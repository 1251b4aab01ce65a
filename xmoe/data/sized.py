"""Base for datasets whose items have sizes known up front (fairseq's batching reads them)."""

import numpy as np
from fairseq.data import FairseqDataset


class SizedDataset(FairseqDataset):
    """Answers fairseq's size queries from `self._sizes` (tokens per item), set by the subclass."""

    _sizes: np.ndarray

    def __len__(self) -> int:
        return len(self._sizes)

    @property
    def sizes(self) -> np.ndarray:
        return self._sizes

    def num_tokens(self, index: int) -> int:
        return int(self._sizes[index])

    def size(self, index: int) -> int:
        return int(self._sizes[index])
