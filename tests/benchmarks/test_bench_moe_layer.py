"""benchmarks/bench_moe_layer.py end to end on a tiny layer: one JSON line with the comparisons
asked for, the kernel and GEMM library the layer's default picked. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xmoe.moe.experts import onednn_linear_available

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_moe_layer.py"


def test_the_layer_benchmark_prints_its_comparisons_and_the_kernel_it_ran():
    # Experts of 16 x 16384 weights: large enough for the oneDNN GEMMs, quick on 64 tokens.
    tiny = ["--tokens", "64", "--d", "16", "--f", "16384", "--experts", "2", "--repeats", "1", "--warmup", "0"]
    out = subprocess.run(
        [sys.executable, str(BENCH), *tiny, "--threads", "1", "--compare-mkl", "--compare-dense-kernel"],
        check=True, capture_output=True, text=True, timeout=300,
    )
    result = json.loads(out.stdout)
    assert result["kernel"] == "grouped" and result["onednn"] is onednn_linear_available()
    for key in ("ratio", "mkl_ratio", "mkl_vs_moe", "dense_kernel_ratio", "moe_vs_dense_kernel"):
        assert result[key] > 0, key
    # the JSON's times are rounded to 10 us
    assert result["moe_vs_dense_kernel"] == pytest.approx(result["moe_s"] / result["dense_kernel_s"], rel=1e-2)
    assert result["moe_peak_mb"] > 0 and result["tokens"] == 64 and result["threads"] == 1
