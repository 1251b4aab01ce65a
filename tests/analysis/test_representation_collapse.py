import math

import numpy as np
import pytest
import torch

from xmoe.analysis import representation_collapse

# Two classes in 2-D: Sigma_B has rank 1, so the pseudo-inverse matters.
#   class 0: (-2, 1), (0, -1)  -> mu_0 = (-1, 0), residuals (-1, 1), (1, -1)
#   class 1: ( 2, 1), (2, -1)  -> mu_1 = ( 2, 0), residuals ( 0, 1), (0, -1)
#   mu_G = (mu_0 + mu_1) / 2 = (0.5, 0); centred means (-1.5, 0), (1.5, 0)
#   Sigma_B = (1/2) * (2.25 + 2.25) e1 e1^T = [[2.25, 0], [0, 0]]  ->  Sigma_B^+ = [[4/9, 0], [0, 0]]
#   Sigma_W = (1/4) * ([[1,-1],[-1,1]] * 2 + [[0,0],[0,1]] * 2) = [[0.5, -0.5], [-0.5, 1]]
#   Sigma_W Sigma_B^+ = [[0.5 * 4/9, 0], [-0.5 * 4/9, 0]]  ->  RC = 2/9
TWO_CLASS_POINTS = [[-2.0, 1.0], [0.0, -1.0], [2.0, 1.0], [2.0, -1.0]]
TWO_CLASS_LABELS = [0, 0, 1, 1]

# Three classes in 2-D (Sigma_B full rank) with unequal sizes:
#   class 0: (1, 0), (-1, 0) -> mu_0 = (0, 0), residuals (+-1, 0)
#   class 1: (3, 1), (3, -1) -> mu_1 = (3, 0), residuals (0, +-1)
#   class 2: (0, 3)          -> mu_2 = (0, 3), residual 0
#   mu_G = (1, 1) (mean of class means, not of tokens); centred means (-1,-1), (2,-1), (-1,2)
#   Sigma_B = (1/3) [[1+4+1, 1-2-2], [1-2-2, 1+1+4]] = [[2, -1], [-1, 2]]
#   Sigma_B^-1 = (1/3) [[2, 1], [1, 2]]            (det = 3)
#   Sigma_W = (1/5) [[2, 0], [0, 2]] = 0.4 I       (N = 5 tokens)
#   RC = Tr(0.4 I Sigma_B^-1) = 0.4 * (2 + 2) / 3 = 8/15
THREE_CLASS_POINTS = [[1.0, 0.0], [-1.0, 0.0], [3.0, 1.0], [3.0, -1.0], [0.0, 3.0]]
THREE_CLASS_LABELS = [0, 0, 1, 1, 2]


def test_two_classes_match_the_hand_computed_value():
    assert representation_collapse(TWO_CLASS_POINTS, TWO_CLASS_LABELS) == pytest.approx(2 / 9, abs=1e-12)


def test_three_unbalanced_classes_match_the_hand_computed_value():
    assert representation_collapse(THREE_CLASS_POINTS, THREE_CLASS_LABELS) == pytest.approx(8 / 15, abs=1e-12)


def test_matches_the_explicit_pseudo_inverse_formula_when_dim_exceeds_classes():
    generator = torch.Generator().manual_seed(0)
    num_tokens, dim, num_classes = 300, 12, 5  # Sigma_B has rank 4 < 12
    labels_N = torch.randint(0, num_classes, (num_tokens,), generator=generator)
    features_ND = torch.randn(num_tokens, dim, generator=generator) + 3 * torch.randn(num_classes, dim, generator=generator)[labels_N]

    h = features_ND.double()
    means_CD = torch.stack([h[labels_N == c].mean(0) for c in range(num_classes)])
    residuals_ND = h - means_CD[labels_N]
    sigma_w = residuals_ND.T @ residuals_ND / num_tokens
    centred_CD = means_CD - means_CD.mean(0)
    sigma_b = centred_CD.T @ centred_CD / num_classes
    expected = torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, hermitian=True, rtol=1e-10)).item()

    assert representation_collapse(features_ND, labels_N) == pytest.approx(expected, rel=1e-9)
    assert representation_collapse(features_ND.float(), labels_N.numpy()) == pytest.approx(expected, rel=1e-6)


def test_tokens_at_their_class_mean_give_zero_perfect_collapse():
    means_CD = np.array([[0.0, 0.0, 1.0], [4.0, 1.0, 0.0], [-2.0, 3.0, 5.0]])
    labels = np.array([0, 1, 2, 2, 1, 0, 0])
    assert representation_collapse(means_CD[labels], labels) == 0.0


def test_collapse_measure_grows_with_within_class_spread():
    points, labels = np.array(THREE_CLASS_POINTS), np.array(THREE_CLASS_LABELS)
    means = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])[labels]
    values = [representation_collapse(means + spread * (points - means), labels) for spread in (0.5, 1.0, 2.0)]
    # Sigma_W scales with spread^2 while Sigma_B stays put.
    assert values == pytest.approx([8 / 15 / 4, 8 / 15, 8 / 15 * 4], abs=1e-12)


def test_relabelling_classes_leaves_the_value_unchanged():
    relabel = np.array([2, 0, 1])
    relabelled = relabel[np.array(THREE_CLASS_LABELS)]
    assert representation_collapse(THREE_CLASS_POINTS, relabelled) == pytest.approx(8 / 15, abs=1e-12)


def test_unlabelled_tokens_and_empty_classes_are_ignored():
    # Labels 0, 1, 2 renamed to 1, 4, 6 (experts 0, 2, 3, 5, 7 get nothing) plus -1 outliers.
    points = THREE_CLASS_POINTS + [[100.0, -50.0], [7.0, 7.0]]
    labels = [1, 1, 4, 4, 6, -1, -1]
    assert representation_collapse(points, labels, num_classes=8) == pytest.approx(8 / 15, abs=1e-12)


def test_fewer_than_two_classes_is_undefined():
    assert math.isnan(representation_collapse([[1.0, 2.0], [3.0, 4.0]], [0, 0]))
    assert math.isnan(representation_collapse([[1.0, 2.0], [3.0, 4.0]], [1, -1]))


def test_labels_beyond_num_classes_are_rejected():
    with pytest.raises(ValueError, match="num_classes"):
        representation_collapse(THREE_CLASS_POINTS, THREE_CLASS_LABELS, num_classes=2)
