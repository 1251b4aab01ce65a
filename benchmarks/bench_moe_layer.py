#!/usr/bin/env python
"""Forward+backward time and peak memory of MoELayer vs a dense FFN of the same active size.

Both run on the same tokens in one process, interleaved (moe, dense, moe, dense, ...) so machine
noise hits both alike; the ratio is the number to read. Prints one JSON line:

    {"moe_s": ..., "dense_s": ..., "ratio": ..., "ratio_min": ..., "ratio_max": ...,
     "moe_peak_mb": ..., "dense_peak_mb": ..., "tokens": ..., "d": ..., "f": ..., "experts": ..., ...}

ratio_min / ratio_max: the spread of the per-round ratios (each round times every layer once).
"kernel" says which expert kernel the layer's default picked on this device: "grouped" (each
expert computes only the tokens it has; the default on CPU) or "padded" (one batched matmul on
the capacity-padded (E, C, D) buffer; the default on GPU). --compare-padded and
--compare-grouped add the same layer forced to that kernel to the rotation: "padded_s",
"padded_ratio" (vs dense), "padded_vs_moe", and the same for grouped. --compare-dropless adds
the same layer with dropless routing (default kernel): "dropless_s", "dropless_ratio" (vs
dense), "dropless_vs_moe", its "dropless_capacity" (the largest expert load), and two
comparisons at the same load (dropless also computes the tokens that capacity routing drops):
"dropless_vs_moe_per_token", the time per computed assignment, dropless over capacity routing,
and "dropless_vs_nodrop": dropless against capacity routing with the smallest capacity factor
that drops nothing on this batch ("nodrop_capacity_factor"), so both compute the same tokens.
--compare-fresh-grads adds the layer with its expert weight gradients written to fresh memory
every step instead of reused memory (StackedExperts.grad_w1_memory / grad_w2_memory = None):
"fresh_grads_s", "fresh_grads_ratio", "fresh_grads_vs_moe". "onednn" says whether the grouped
kernel's float32 CPU GEMMs ran on oneDNN (StackedExperts.onednn_gemm, see
xmoe.moe.experts.onednn_linear_available) rather than on torch's default, MKL, which the dense
FFN (nn.Linear) uses. --compare-mkl adds the layer with oneDNN off: "mkl_s", "mkl_ratio",
"mkl_vs_moe". --compare-dense-kernel adds the dense FFN run through the layer's own expert
kernel (one expert holding every token, so the same GEMM library as the experts):
"dense_kernel_s", "dense_kernel_ratio" (vs the nn.Linear FFN) and "moe_vs_dense_kernel", the
price of routing and of splitting the GEMMs by expert, with the GEMM library the same on both
sides.

--compare-env THP_MEM_ALLOC_ENABLE=1 runs all of this in child processes with and without the
setting, interleaved, and prints medians and ratios instead (see benchmarks/bench_common.py).

Peak memory is measured in a fresh child process per model: the growth of the peak, from just
before the module is built to the end of one forward+backward, so it counts weights, gradients
and activations (torch.cuda.max_memory_allocated on CUDA; the peak resident set on CPU, where
the allocator keeps no counter).

    python benchmarks/bench_moe_layer.py                      # defaults: 8192 tokens, d 512, f 2048, 32 experts
    python benchmarks/bench_moe_layer.py --gate switch --top-k 1 --dtype bfloat16
    python benchmarks/bench_moe_layer.py --threads 1 --compare-env THP_MEM_ALLOC_ENABLE=1 --env-rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_common import add_compare_env_arguments, child_env, compare_env, max_rss_mb  # noqa: E402
from xmoe.moe import GATES, MoELayer, StackedExperts  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per batch (default 8192)")
    parser.add_argument("--d", type=int, default=512, help="model dimension (default 512)")
    parser.add_argument("--f", type=int, default=2048, help="FFN hidden dimension of each expert and of the dense FFN")
    parser.add_argument("--experts", type=int, default=32, help="number of experts (default 32)")
    parser.add_argument("--gate", choices=GATES, default="xmoe", help="router (default xmoe)")
    parser.add_argument("--top-k", type=int, default=1, help="experts per token (default 1; gshard needs 2)")
    parser.add_argument("--capacity-factor", type=float, default=1.0, help="<= 0 means dropless (default 1.0)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="autocast dtype (float32 = off)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds; the median is reported (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per model first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--compare-padded", action="store_true", help="also time the capacity-padded expert kernel")
    parser.add_argument("--compare-grouped", action="store_true", help="also time the grouped expert kernel")
    parser.add_argument(
        "--compare-dropless",
        action="store_true",
        help="also time the same layer with dropless routing, and with the capacity that drops nothing",
    )
    parser.add_argument(
        "--compare-fresh-grads",
        action="store_true",
        help="also time the layer with its expert weight gradients in fresh memory every step",
    )
    parser.add_argument(
        "--compare-mkl", action="store_true", help="also time the layer with oneDNN off (all GEMMs on MKL)"
    )
    parser.add_argument(
        "--compare-dense-kernel",
        action="store_true",
        help="also time the dense FFN run through the layer's expert kernel (one expert, same GEMMs)",
    )
    parser.add_argument("--measure", choices=["moe", "dense"], help=argparse.SUPPRESS)  # child mode: memory only
    add_compare_env_arguments(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.tokens < 1:
        parser.error("--repeats and --tokens must be positive")
    return args


def build(which: str, args) -> nn.Module:
    torch.manual_seed(0)
    if which == "moe":
        module = MoELayer(
            args.d, args.f, args.experts, gate=args.gate, top_k=args.top_k, capacity_factor=args.capacity_factor
        )
    else:
        module = nn.Sequential(nn.Linear(args.d, args.f), nn.GELU(), nn.Linear(args.f, args.d))
    return module.to(args.device)


class DenseThroughExpertKernel(nn.Module):
    """The dense FFN computed by the MoE layer's expert kernel: one expert holding every token."""

    def __init__(self, d_model: int, d_ffn: int):
        super().__init__()
        self.experts = StackedExperts(1, d_model, d_ffn)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.experts.grouped(x_TD, [x_TD.shape[0]])


def step(module: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> None:
    x = x.detach().requires_grad_()
    with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = module(x)
        y = out[0] if isinstance(out, tuple) else out
    y.float().square().mean().backward()
    module.zero_grad(set_to_none=True)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(module, x, args) -> float:
    synchronize(args.device)
    start = time.perf_counter()
    step(module, x, DTYPES[args.dtype])
    synchronize(args.device)
    return time.perf_counter() - start


def peak_mb(args, x: torch.Tensor) -> float:
    """Child mode: build args.measure's module, run one step, return the peak growth in MiB."""
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**20 if cuda else max_rss_mb()
    step(build(args.measure, args), x, DTYPES[args.dtype])
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20 - before
    return max_rss_mb() - before


def peak_mb_in_child(which: str, argv: list[str]) -> float:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv, "--measure", which],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout)["peak_mb"]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.compare_env and not args.env_child:
        print(json.dumps(compare_env(__file__, argv, args.compare_env, args.env_rounds)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.randn(args.tokens, args.d, generator=torch.Generator().manual_seed(1)).to(args.device)
    if args.measure:
        print(json.dumps({"peak_mb": peak_mb(args, x)}))
        return
    moe, dense = build("moe", args), build("dense", args)
    layers = {"moe": moe, "dense": dense}
    for kernel, grouped in (("padded", False), ("grouped", True)):
        if getattr(args, f"compare_{kernel}"):
            layers[kernel] = build("moe", args)  # same seed: the same weights
            layers[kernel].grouped_experts = grouped
    if args.compare_dropless:
        layers["dropless"] = build("moe", args)
        layers["dropless"].capacity_factor = layers["dropless"].eval_capacity_factor = 0.0
        with torch.no_grad():
            largest_load = layers["dropless"](x)[1].stats["capacity"]
        # capacity_for takes ceil(factor * k * T / E): this factor gives exactly the largest load.
        nodrop_factor = (largest_load - 0.5) * args.experts / (args.top_k * args.tokens)
        layers["nodrop"] = build("moe", args)
        layers["nodrop"].capacity_factor = layers["nodrop"].eval_capacity_factor = nodrop_factor
    if args.compare_fresh_grads:
        layers["fresh_grads"] = build("moe", args)
        layers["fresh_grads"].experts.grad_w1_memory = layers["fresh_grads"].experts.grad_w2_memory = None
    if args.compare_mkl:
        layers["mkl"] = build("moe", args)
        layers["mkl"].experts.onednn_gemm = False
    if args.compare_dense_kernel:
        torch.manual_seed(0)
        layers["dense_kernel"] = DenseThroughExpertKernel(args.d, args.f).to(args.device)

    for _ in range(args.warmup):
        for module in layers.values():
            timed(module, x, args)
    times = {name: [] for name in layers}
    for _ in range(args.repeats):
        for name, module in layers.items():
            times[name].append(timed(module, x, args))
    with torch.no_grad():
        dropped = moe(x)[1].stats["dropped_fraction"]
    kernel = "grouped" if moe.uses_grouped_kernel(x.device) else "padded"
    moe_times, dense_times = times["moe"], times["dense"]
    round_ratios = [m / d for m, d in zip(moe_times, dense_times)]

    moe_peak, dense_peak = peak_mb_in_child("moe", argv), peak_mb_in_child("dense", argv)

    moe_s, dense_s = statistics.median(moe_times), statistics.median(dense_times)
    result = {
        "moe_s": round(moe_s, 5),
        "dense_s": round(dense_s, 5),
        "ratio": round(moe_s / dense_s, 3),
        "ratio_min": round(min(round_ratios), 3),
        "ratio_max": round(max(round_ratios), 3),
        "moe_peak_mb": round(moe_peak, 1),
        "dense_peak_mb": round(dense_peak, 1),
        "tokens": args.tokens,
        "d": args.d,
        "f": args.f,
        "experts": args.experts,
        "gate": args.gate,
        "top_k": args.top_k,
        "capacity_factor": args.capacity_factor,
        "dropped_fraction": round(float(dropped), 4),
        "kernel": kernel,
        "onednn": kernel == "grouped" and moe.experts.grouped_uses_onednn(x),
        "dtype": args.dtype,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "torch": torch.__version__,
        "load_average": round(os.getloadavg()[0], 2),
    }
    for name in ("padded", "grouped", "dropless", "nodrop", "fresh_grads", "mkl", "dense_kernel"):
        if name in times:
            name_s = statistics.median(times[name])
            result.update({f"{name}_s": round(name_s, 5), f"{name}_ratio": round(name_s / dense_s, 3)})
            result[f"{name}_vs_moe"] = round(name_s / moe_s, 3)
    if args.compare_dense_kernel:
        result["moe_vs_dense_kernel"] = round(moe_s / statistics.median(times["dense_kernel"]), 3)
    if args.compare_dropless:
        with torch.no_grad():
            nodrop_stats = layers["nodrop"](x)[1].stats
        result.update(dropless_capacity=largest_load, nodrop_capacity=nodrop_stats["capacity"])
        result.update(nodrop_capacity_factor=round(nodrop_factor, 4), nodrop_dropped=nodrop_stats["dropped_fraction"])
        # Dropless computes every assignment, capacity routing only the kept ones.
        kept = 1.0 - float(dropped)
        result["dropless_vs_moe_per_token"] = round(result["dropless_vs_moe"] * kept, 3)
        result["dropless_vs_nodrop"] = round(result["dropless_s"] / result["nodrop_s"], 3)
    if args.env_child:
        result["env"] = child_env(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
