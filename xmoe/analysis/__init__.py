"""What to measure on a trained X-MoE encoder: the paper's routing and representation analyses
(routing fluctuation, representation collapse, expert load, inter-run consistency), cross-lingual
retrieval accuracy, and PNG plots of them. Plain torch/numpy (matplotlib for plots only); never
imports fairseq, so it runs on exported models and on saved routing statistics alike.
"""

from xmoe.analysis.metrics import (
    RoutingChanges,
    expert_counts,
    expert_load,
    inter_run_consistency,
    mean_pool,
    normalize_counts,
    representation_collapse,
    retrieval_accuracy,
    routing_changes,
    routing_fluctuation,
    routing_fluctuation_series,
)
from xmoe.analysis.plots import plot_expert_load_heatmap, plot_metric_over_updates

__all__ = [
    "RoutingChanges",
    "expert_counts",
    "expert_load",
    "inter_run_consistency",
    "mean_pool",
    "normalize_counts",
    "plot_expert_load_heatmap",
    "plot_metric_over_updates",
    "representation_collapse",
    "retrieval_accuracy",
    "routing_changes",
    "routing_fluctuation",
    "routing_fluctuation_series",
]
