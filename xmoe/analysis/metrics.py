"""Routing and representation measures from the X-MoE paper, and cross-lingual retrieval accuracy.

Shape legend: N = tokens (or sentences), D = hidden dim, C = classes (experts that received
tokens), E = experts, G = groups (e.g. languages), R = runs, B = batch, T = positions.

Every function accepts torch tensors (any device), numpy arrays or nested lists, and returns
Python floats or numpy arrays, so results go straight to JSON and matplotlib. The one exception
is `mean_pool`, which stays in torch because it sits inside an evaluation forward pass.

Expert assignments use the convention of `xmoe.moe.MoEAux.expert_index`: the top-1 expert per
token, -1 where the token was padding or dropped by capacity. Every function here ignores -1.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import NamedTuple, Sequence, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]

NOT_ROUTED = -1  # expert index of padding and capacity-dropped tokens


def as_numpy_array(values: ArrayLike, dtype: np.dtype | type | None = None) -> np.ndarray:
    """A numpy copy/view of a tensor (detached, on CPU), array or nested list, cast to dtype."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        # numpy has no bfloat16; float64 is what every caller below wants anyway.
        if values.is_floating_point():
            values = values.to(torch.float64)
        values = values.numpy()
    return np.asarray(values, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Routing fluctuation
# ---------------------------------------------------------------------------------------------


class RoutingChanges(NamedTuple):
    changed: int  # tokens routed (not -1) in both routings whose expert differs
    compared: int  # tokens routed (not -1) in both routings

    @property
    def fraction(self) -> float:
        return self.changed / self.compared if self.compared else math.nan


def routing_changes(assignments_a: ArrayLike, assignments_b: ArrayLike) -> RoutingChanges:
    """Count the tokens whose expert differs between two routings of the same tokens.

    The two arrays hold the expert of each token (any shape, e.g. (B, T); both the same shape,
    compared element by element). A token that is -1 (padding, or dropped by capacity) in either
    routing is left out of both counts: it has no expert to compare.
    """
    experts_a = as_numpy_array(assignments_a, np.int64).reshape(-1)  # (N,)
    experts_b = as_numpy_array(assignments_b, np.int64).reshape(-1)  # (N,)
    if experts_a.shape != experts_b.shape:
        raise ValueError(
            f"routings cover different token counts: {experts_a.shape[0]} vs {experts_b.shape[0]}; "
            "routing fluctuation compares the same tokens under two checkpoints"
        )
    routed_in_both = (experts_a != NOT_ROUTED) & (experts_b != NOT_ROUTED)
    changed = int((experts_a[routed_in_both] != experts_b[routed_in_both]).sum())
    return RoutingChanges(changed=changed, compared=int(routed_in_both.sum()))


def routing_fluctuation(assignments_a: ArrayLike, assignments_b: ArrayLike) -> float:
    """Routing fluctuation RF = changed / compared (see `routing_changes` for the counts).

    compared = tokens routed in both routings (tokens that are -1 in either are ignored),
    changed = those among them whose expert differs. NaN when no token is routed in both.
    The paper computes it between consecutive checkpoints on the same input tokens.
    """
    return routing_changes(assignments_a, assignments_b).fraction


def routing_fluctuation_series(assignments_per_checkpoint: Sequence[ArrayLike]) -> list[float]:
    """RF between each pair of consecutive checkpoints: [RF(0, 1), RF(1, 2), ...].

    Returns one value fewer than there are checkpoints (an empty list for fewer than two).
    """
    return [
        routing_fluctuation(earlier, later)
        for earlier, later in zip(assignments_per_checkpoint[:-1], assignments_per_checkpoint[1:])
    ]


# ---------------------------------------------------------------------------------------------
# Representation collapse
# ---------------------------------------------------------------------------------------------


def representation_collapse(
    features_ND: ArrayLike,
    labels_N: ArrayLike,
    num_classes: int | None = None,
    rtol: float = 1e-10,
) -> float:
    """Representation collapse RC = Tr(Sigma_W Sigma_B^+) of token representations grouped by expert.

    h_i = features_ND[i], c_i = labels_N[i] (the expert token i is routed to). Tokens labelled -1
    are ignored, and classes with no tokens do not exist for the formula; C counts the rest.

        mu_c    = mean of the h_i with c_i = c                     (class mean)
        mu_G    = (1/C) sum_c mu_c                                 (mean of class means)
        Sigma_W = (1/N) sum_i (h_i - mu_{c_i}) (h_i - mu_{c_i})^T  (within-class, N = labelled tokens)
        Sigma_B = (1/C) sum_c (mu_c - mu_G) (mu_c - mu_G)^T        (between-class)
        RC      = Tr(Sigma_W Sigma_B^+)                            (^+ = Moore-Penrose pseudo-inverse)

    NOTE: RC is not divided by C. That is the formula as the X-MoE paper writes it; the neural-
    collapse literature's NC1 (Papyan et al.) is RC / C. Compare RC only between settings with the
    same number of experts receiving tokens.

    Lower RC = tighter clusters around the class means relative to the spread of the means = more
    collapsed. It is 0 when every token equals its class mean. Only within-class spread inside the
    span of the centred class means counts, because Sigma_B^+ is zero outside it. The paper plots
    RC over pre-training: SMoE's falls, X-MoE's stays higher.

    Sigma_B has rank <= C - 1 (the centred means sum to zero), so its pseudo-inverse must drop the
    zero eigenvalues, which arithmetic turns into tiny non-zero ones: eigenvalues below
    rtol * (largest eigenvalue) count as zero. The default 1e-10 (a ratio of 1e-5 in standard
    deviation) keeps every direction in which the class means differ measurably and drops the
    exact-zero ones, which float64 round-off leaves many orders of magnitude below it.

    Computed in float64 without forming D x D matrices: with the centred class means M (C, D) =
    U S V^T, Sigma_B^+ = sum_k (C / s_k^2) v_k v_k^T over kept s_k, hence
    RC = sum_k (C / s_k^2) (1/N) ||R v_k||^2 with R (N, D) the within-class residuals.

    Returns NaN when fewer than two classes have tokens (Sigma_B = 0: RC is undefined, and the
    pseudo-inverse's answer of 0 would misread as perfect collapse).
    """
    features = as_numpy_array(features_ND)  # (N, D)
    labels = as_numpy_array(labels_N, np.int64).reshape(-1)  # (N,)
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"need features (N, D) and labels (N,); got {features.shape} and {labels.shape}")
    if (labels < NOT_ROUTED).any():
        raise ValueError("labels must be class indices >= 0, or -1 for tokens to ignore")
    if num_classes is not None and (labels >= num_classes).any():
        raise ValueError(f"label {int(labels.max())} out of range for num_classes={num_classes}")

    # Group the labelled tokens by class so that each class is one contiguous block: means and
    # residuals then come from slices, in place, with a single float64 copy of the features.
    labelled_rows = np.flatnonzero(labels != NOT_ROUTED)
    rows_by_class = labelled_rows[np.argsort(labels[labelled_rows], kind="stable")]
    residuals_ND = features[rows_by_class].astype(np.float64, copy=False)  # becomes h_i - mu_{c_i} below
    _, counts_C = np.unique(labels[rows_by_class], return_counts=True)  # classes with no tokens vanish
    num_present = counts_C.shape[0]
    if num_present < 2:
        return math.nan

    block_bounds = np.concatenate([[0], np.cumsum(counts_C)])
    means_CD = np.empty((num_present, residuals_ND.shape[1]))
    for c in range(num_present):
        class_block = residuals_ND[block_bounds[c] : block_bounds[c + 1]]  # a view
        means_CD[c] = class_block.mean(axis=0)  # mu_c
        class_block -= means_CD[c]
    centred_means_CD = means_CD - means_CD.mean(axis=0)  # mu_c - mu_G

    _, singular_values, right_vectors = np.linalg.svd(centred_means_CD, full_matrices=False)
    eigenvalues = singular_values**2 / num_present  # of Sigma_B, largest first
    kept = eigenvalues > rtol * eigenvalues[0]
    if not kept.any():  # all class means coincide
        return math.nan
    directions_KD = right_vectors[kept]  # eigenvectors of Sigma_B with non-zero eigenvalue
    within_variance_K = ((residuals_ND @ directions_KD.T) ** 2).mean(axis=0)  # v_k^T Sigma_W v_k
    return float((within_variance_K / eigenvalues[kept]).sum())


# ---------------------------------------------------------------------------------------------
# Expert load and inter-run consistency
# ---------------------------------------------------------------------------------------------


def expert_counts(
    assignments: ArrayLike,
    num_experts: int,
    groups: ArrayLike | None = None,
    num_groups: int | None = None,
) -> np.ndarray:
    """Tokens per expert per group -> (G, E) int64 counts. Tokens with expert -1 are ignored.

    groups: a group id >= 0 per token (same shape as assignments), e.g. the language of each
    token; None puts all tokens in one group (G = 1). num_groups defaults to max(group id) + 1.
    Counts add up across batches, which is how the paper accumulates loads (every 100
    mini-batches) before normalising with `expert_load`.
    """
    experts_N = as_numpy_array(assignments, np.int64).reshape(-1)
    groups_N = np.zeros_like(experts_N) if groups is None else as_numpy_array(groups, np.int64).reshape(-1)
    if groups_N.shape != experts_N.shape:
        raise ValueError(f"one group id per token: got {groups_N.shape[0]} ids for {experts_N.shape[0]} tokens")
    if (experts_N < NOT_ROUTED).any() or (experts_N >= num_experts).any():
        raise ValueError(f"expert indices must lie in [0, {num_experts}) or be -1")
    if (groups_N < 0).any():
        raise ValueError("group ids must be >= 0")
    if num_groups is None:
        num_groups = int(groups_N.max()) + 1 if groups_N.size else 1
    elif groups_N.size and groups_N.max() >= num_groups:
        raise ValueError(f"group id {int(groups_N.max())} out of range for num_groups={num_groups}")

    routed = experts_N != NOT_ROUTED
    flat_cell = groups_N[routed] * num_experts + experts_N[routed]  # row-major (group, expert) cell
    return np.bincount(flat_cell, minlength=num_groups * num_experts).reshape(num_groups, num_experts)


def expert_load(
    assignments: ArrayLike,
    num_experts: int,
    groups: ArrayLike | None = None,
    num_groups: int | None = None,
) -> np.ndarray:
    """Fraction of each group's routed tokens that go to each expert -> (G, E) float64.

    load[g, e] = count[g, e] / sum_e' count[g, e'] with counts from `expert_counts` (same
    arguments; -1 ignored). Each row sums to 1; a group with no routed token is a row of NaN.
    """
    return normalize_counts(expert_counts(assignments, num_experts, groups, num_groups))


def normalize_counts(counts_GE: ArrayLike) -> np.ndarray:
    """Turn (G, E) expert counts (e.g. accumulated over batches) into per-row fractions; empty rows -> NaN."""
    counts = as_numpy_array(counts_GE, np.float64)
    totals = counts.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / totals, np.nan)


def inter_run_consistency(loads_RE: ArrayLike) -> float:
    """Mean pairwise Pearson correlation of the expert-load vectors of R runs.

        r(a, b) = sum_e (a_e - mean a)(b_e - mean b) / sqrt(sum_e (a_e - mean a)^2 * sum_e (b_e - mean b)^2)
        consistency = mean over the R(R-1)/2 pairs of runs i < j of r(load_i, load_j)

    loads_RE: one load vector per run; trailing dimensions are flattened, so (R, G, E) loads per
    language (or per layer) are compared as one vector per run. 1 = every run routes the same
    way; the paper reports it over 12 fine-tuning runs.

    Raises ValueError for fewer than two runs, for NaN loads, and for a run whose load vector is
    constant: its correlation is undefined (0 / 0), and no value would be honest to average in.
    """
    loads = as_numpy_array(loads_RE, np.float64)
    if loads.ndim < 2:
        raise ValueError(f"need one load vector per run, shape (R, E) or (R, G, E); got shape {loads.shape}")
    loads = loads.reshape(loads.shape[0], -1)  # (R, E)
    num_runs = loads.shape[0]
    if num_runs < 2:
        raise ValueError(f"inter-run consistency needs at least 2 runs, got {num_runs}")
    if np.isnan(loads).any():
        raise ValueError("loads contain NaN (a group with no routed tokens?); drop or fill it first")
    centred = loads - loads.mean(axis=1, keepdims=True)
    norms = np.sqrt((centred**2).sum(axis=1))  # (R,)
    constant_runs = np.flatnonzero(norms <= 1e-12 * np.abs(loads).max(axis=1).clip(min=1e-300))
    if constant_runs.size:
        raise ValueError(
            f"run(s) {constant_runs.tolist()} have a constant load vector: the Pearson correlation "
            "with a constant is undefined"
        )
    unit = centred / norms[:, None]
    correlations = [float(unit[i] @ unit[j]) for i, j in combinations(range(num_runs), 2)]
    return float(np.mean(correlations))


# ---------------------------------------------------------------------------------------------
# Cross-lingual retrieval
# ---------------------------------------------------------------------------------------------


def mean_pool(hidden_BTD: torch.Tensor, padding_mask_BT: torch.Tensor | None) -> torch.Tensor:
    """Average the hidden states of the non-padding positions of each sequence -> (B, D).

    padding_mask_BT is True at padding (fairseq's convention); None means no padding. Padding
    positions are zeroed before the sum (not multiplied by 0), so NaN or inf there cannot leak in.
    A sequence that is all padding pools to zeros. fp16/bf16 hidden states are summed, and
    returned, in float32 so that long sequences do not lose precision.
    """
    hidden = hidden_BTD.float() if hidden_BTD.dtype in (torch.float16, torch.bfloat16) else hidden_BTD
    if padding_mask_BT is None:
        return hidden.mean(dim=1)
    padding_BT1 = padding_mask_BT.bool().unsqueeze(-1)
    summed_BD = hidden.masked_fill(padding_BT1, 0.0).sum(dim=1)
    lengths_B1 = (~padding_BT1).sum(dim=1).clamp(min=1).to(hidden.dtype)
    return summed_BD / lengths_B1


def _nearest_neighbours(queries_ND: torch.Tensor, keys_ND: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    # Row chunks keep memory at chunk x N rather than N x N for large test sets.
    return torch.cat([(queries_ND[i : i + chunk] @ keys_ND.T).argmax(dim=1) for i in range(0, len(queries_ND), chunk)])


def retrieval_accuracy(src_emb_ND: ArrayLike, tgt_emb_ND: ArrayLike) -> dict[str, float | int]:
    """Cross-lingual retrieval accuracy over N parallel pairs (Tatoeba-style), both directions.

    Row i of src and row i of tgt are translations. Each source sentence retrieves the target
    with the highest cosine similarity cos(s, t) = s.t / (|s| |t|); it is correct when that is row
    i. Likewise target -> source. Ties go to the lowest row index; a zero vector has cosine 0
    with everything.

    Returns {"src_to_tgt": accuracy, "tgt_to_src": accuracy, "num_pairs": N}.
    """
    src = torch.as_tensor(as_numpy_array(src_emb_ND, np.float64))
    tgt = torch.as_tensor(as_numpy_array(tgt_emb_ND, np.float64))
    if src.ndim != 2 or src.shape != tgt.shape:
        raise ValueError(f"need two (N, D) arrays of parallel embeddings; got {tuple(src.shape)} and {tuple(tgt.shape)}")
    src_unit = torch.nn.functional.normalize(src, dim=1)
    tgt_unit = torch.nn.functional.normalize(tgt, dim=1)
    num_pairs = src.shape[0]
    gold = torch.arange(num_pairs)
    src_to_tgt = (_nearest_neighbours(src_unit, tgt_unit) == gold).double().mean().item() if num_pairs else math.nan
    tgt_to_src = (_nearest_neighbours(tgt_unit, src_unit) == gold).double().mean().item() if num_pairs else math.nan
    return {"src_to_tgt": src_to_tgt, "tgt_to_src": tgt_to_src, "num_pairs": num_pairs}
