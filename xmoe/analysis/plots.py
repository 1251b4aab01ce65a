"""PNG figures for the analyses: a metric over training updates, and expert load per language.

NOTE: figures are built with matplotlib's object API (Figure + Agg canvas), never pyplot, so
nothing touches the global backend, no display is needed, and no figure leaks between calls.
matplotlib is the optional `plot` extra (pip install xmoe[plot]); it is imported on first use
so that `xmoe.analysis` metrics work without it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np

from xmoe.analysis.metrics import ArrayLike, as_numpy_array

PathLike = Union[str, Path]


def _new_figure(width_in: float, height_in: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'xmoe[plot]'") from error
    figure = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120)
    return path


def plot_metric_over_updates(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: PathLike,
    metric_name: str,
    title: str | None = None,
    log_y: bool = False,
) -> Path:
    """Line plot of one metric over training updates, one line per model or run.

    series: label -> (updates, values), e.g. {"SMoE": ([1000, 2000], [0.31, 0.22]), "X-MoE": ...}
    for RF or RC over pre-training. NaN values leave a gap. Writes a PNG and returns its path.
    """
    figure = _new_figure(6.0, 4.0)
    axes = figure.add_subplot()
    for label, (updates, values) in series.items():
        updates_array, values_array = np.asarray(updates, dtype=float), np.asarray(values, dtype=float)
        if updates_array.shape != values_array.shape:
            raise ValueError(f"series {label!r}: {updates_array.size} updates but {values_array.size} values")
        axes.plot(updates_array, values_array, marker="o", markersize=3, label=label)
    axes.set_xlabel("updates")
    axes.set_ylabel(metric_name)
    if log_y:
        axes.set_yscale("log")
    axes.set_title(title if title is not None else f"{metric_name} over training")
    axes.grid(True, alpha=0.3)
    if series:
        axes.legend()
    return _save(figure, path)


def plot_expert_load_heatmap(
    load_GE: ArrayLike,
    path: PathLike,
    group_names: Sequence[str] | None = None,
    title: str = "expert load",
    group_label: str = "language",
    annotate: bool | None = None,
) -> Path:
    """Heatmap of expert load: rows are groups (languages), columns experts, colour = fraction.

    load_GE: (G, E), e.g. from `expert_load(..., groups=language_ids)`. group_names label the rows
    (default: the row index) and group_label names the axis; a NaN row (a group with no routed
    token) stays blank. annotate writes each value in its cell; by default only when the
    grid is small enough (<= 16 x 16) to read. Writes a PNG and returns its path.
    """
    load = as_numpy_array(load_GE, np.float64)
    if load.ndim != 2:
        raise ValueError(f"load must be (groups, experts), got shape {load.shape}")
    num_groups, num_experts = load.shape
    names = list(group_names) if group_names is not None else [str(g) for g in range(num_groups)]
    if len(names) != num_groups:
        raise ValueError(f"{len(names)} group names for {num_groups} rows")
    if annotate is None:
        annotate = num_groups <= 16 and num_experts <= 16

    figure = _new_figure(max(4.0, 1.0 + 0.45 * num_experts), max(3.0, 1.0 + 0.35 * num_groups))
    axes = figure.add_subplot()
    image = axes.imshow(load, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, label="fraction of tokens")
    axes.set_xticks(range(num_experts), [str(e) for e in range(num_experts)])
    axes.set_yticks(range(num_groups), names)
    axes.set_xlabel("expert")
    axes.set_ylabel(group_label)
    axes.set_title(title)
    if annotate:
        threshold = np.nanmax(load) / 2 if np.isfinite(load).any() else math.inf
        for g in range(num_groups):
            for e in range(num_experts):
                if np.isfinite(load[g, e]):
                    colour = "black" if load[g, e] > threshold else "white"  # legible on viridis
                    axes.text(e, g, f"{load[g, e]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    return _save(figure, path)


def plot_grouped_bars(
    values: Mapping[str, Mapping[str, float]],
    path: PathLike,
    metric_name: str,
    title: str,
) -> Path:
    """Grouped bar chart: one group of bars per key (a language pair or a language), one bar per
    encoder or baseline, e.g. {"xmoe": {"en-de": 22.0, ...}, "random init": {...}, "TF-IDF": {...}}.
    A missing or NaN value leaves its bar out. Writes a PNG and returns its path."""
    labels = list(values)
    keys = list(dict.fromkeys(key for series in values.values() for key in series))
    figure = _new_figure(max(6.0, 1.0 + 0.25 * len(keys) * max(1, len(labels))), 4.0)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(labels))
    for index, label in enumerate(labels):
        heights = np.array([values[label].get(key, math.nan) for key in keys], dtype=float)
        axes.bar(np.arange(len(keys)) + (index - (len(labels) - 1) / 2) * width, heights, width, label=label)
    axes.set_xticks(range(len(keys)), keys)
    axes.set_ylabel(metric_name)
    axes.set_title(title)
    axes.grid(True, axis="y", alpha=0.3)
    if labels:
        axes.legend(fontsize=7)
    return _save(figure, path)
