import math

import numpy as np
import pytest
import torch

from xmoe.analysis import mean_pool, retrieval_accuracy


def unit_at(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_identical_embeddings_retrieve_perfectly():
    embeddings = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    assert retrieval_accuracy(embeddings, embeddings) == {"src_to_tgt": 1.0, "tgt_to_src": 1.0, "num_pairs": 20}


def test_one_confusion_in_one_direction():
    # Angles: src 0, 90, 30 degrees; tgt 14, 90, 47 degrees (cosine ranks by angle difference).
    #   s0 (0):  t0 at 14, t2 at 47          -> t0 correct
    #   s1 (90): t1 at 0                     -> t1 correct
    #   s2 (30): t0 at 16, t2 at 17          -> t0 WRONG
    #   t0 (14): s0 at 14, s2 at 16          -> s0 correct;  t2 (47): s2 at 17 -> correct
    src = np.array([unit_at(0), unit_at(90), unit_at(30)]) * np.array([[2.0], [0.5], [3.0]])  # norms do not matter
    tgt = np.array([unit_at(14), unit_at(90), unit_at(47)])
    accuracy = retrieval_accuracy(src, tgt)
    assert accuracy["src_to_tgt"] == pytest.approx(2 / 3)
    assert accuracy["tgt_to_src"] == 1.0


def test_mean_pool_averages_only_non_padding_positions():
    hidden_BTD = torch.tensor(
        [
            [[1.0, 2.0], [3.0, 4.0], [1000.0, 1000.0]],
            [[5.0, -1.0], [float("nan"), float("inf")], [1000.0, 1000.0]],
            [[7.0, 7.0], [7.0, 7.0], [7.0, 7.0]],
        ]
    )
    padding_BT = torch.tensor([[False, False, True], [False, True, True], [True, True, True]])
    pooled_BD = mean_pool(hidden_BTD, padding_BT)
    assert pooled_BD.tolist() == [[2.0, 3.0], [5.0, -1.0], [0.0, 0.0]]  # all-padding row -> zeros
    assert mean_pool(hidden_BTD[:1, :2], None).tolist() == [[2.0, 3.0]]


def test_mean_pool_of_half_precision_returns_float32():
    hidden_BTD = torch.ones(1, 4, 2, dtype=torch.bfloat16)
    assert mean_pool(hidden_BTD, torch.zeros(1, 4, dtype=torch.bool)).dtype == torch.float32
