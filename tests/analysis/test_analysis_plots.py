import ast
from pathlib import Path

import numpy as np

import xmoe.analysis
from xmoe.analysis import plot_expert_load_heatmap, plot_metric_over_updates

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_is_png(path, min_bytes: int = 2000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_bytes  # an empty canvas compresses far below this


def test_metric_over_updates_writes_a_png(tmp_path):
    series = {
        "SMoE": ([1000, 2000, 3000, 4000], [0.30, 0.21, 0.15, 0.12]),
        "X-MoE": ([1000, 2000, 3000, 4000], [0.28, 0.10, 0.04, float("nan")]),
    }
    path = plot_metric_over_updates(series, tmp_path / "plots" / "rf.png", metric_name="routing fluctuation")
    assert path == tmp_path / "plots" / "rf.png"
    assert_is_png(path)


def test_expert_load_heatmap_writes_a_png(tmp_path):
    load_GE = np.random.default_rng(0).dirichlet(np.ones(8), size=3)
    path = plot_expert_load_heatmap(load_GE, tmp_path / "load.png", group_names=["en", "de", "zh"])
    assert_is_png(path)


def test_analysis_imports_neither_fairseq_nor_pyplot():
    # Read the imports from the source instead of importing in a fresh interpreter: same answer
    # without paying a torch start-up. xmoe.analysis may import xmoe.analysis.* and nothing else of xmoe.
    imported = set()
    for source in Path(xmoe.analysis.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
    assert not {name for name in imported if name.split(".")[0] == "fairseq" or name == "matplotlib.pyplot"}
    assert {name for name in imported if name.startswith("xmoe")} <= {"xmoe.analysis.metrics", "xmoe.analysis.plots"}
