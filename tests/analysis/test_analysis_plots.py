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


def imported_modules(source: Path, top_level_only: bool) -> set[str]:
    """Module names a file imports (read from its source: no interpreter start-up needed)."""
    tree = ast.parse(source.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    imported = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    return imported


def test_analysis_imports_neither_fairseq_nor_pyplot():
    # The metrics and plots (all that `import xmoe.analysis` loads) import no fairseq and no
    # other part of xmoe, so they run on exported models and saved statistics alike.
    package = Path(xmoe.analysis.__file__).parent
    imported = set()
    for name in ("__init__.py", "metrics.py", "plots.py"):
        imported |= imported_modules(package / name, top_level_only=False)
    assert not {name for name in imported if name.split(".")[0] == "fairseq" or name == "matplotlib.pyplot"}
    assert {name for name in imported if name.startswith("xmoe")} <= {"xmoe.analysis.metrics", "xmoe.analysis.plots"}


def test_analysis_commands_import_fairseq_only_when_they_read_data_or_checkpoints():
    # The CLI modules read binarized data and checkpoints, which needs fairseq; they import it
    # inside the functions that do, so `xmoe-analyze --help` starts without it.
    package = Path(xmoe.analysis.__file__).parent
    for source in sorted(package.glob("*.py")) + [package.parent / "retrieval.py"]:
        top_level = imported_modules(source, top_level_only=True)
        assert not {name for name in top_level if name.split(".")[0] == "fairseq" or name == "matplotlib.pyplot"}, source
        # xmoe.models / xmoe.tasks / xmoe.checkpoint register or pull in fairseq
        assert not {name for name in top_level if name.split(".")[:2] in (["xmoe", "models"], ["xmoe", "tasks"],
                                                                          ["xmoe", "checkpoint"], ["xmoe", "data"])}, source
