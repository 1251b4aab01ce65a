#!/usr/bin/env python
"""End-to-end training throughput of X-MoE / SMoE encoders vs the dense encoder of the same
active size (each token runs one FFN of the same width), measured in one run.

One training step = forward + masked-LM loss + balance loss + backward + Adam step, on the
same batches for every model. Models take turns window by window (dense, xmoe, switch, ...,
dense, xmoe, ...) so machine noise hits them alike; throughput is the median over windows of
tokens per second (fairseq's "wps" counts tokens too). Prints one JSON line:

    {"dense": {"wps": ...}, "models": {"xmoe": {"wps": ..., "ratio_vs_dense": ...}, ...},
     "peak_rss_mb": ..., "load_average": ..., ...}

The MoE models' expert GEMMs run on oneDNN where xmoe's grouped kernel uses it (float32 on CPU;
see xmoe.moe.experts.onednn_linear_available; "onednn" in the JSON), every other layer of both
models on torch's default (MKL on x86 CPUs); --expert-gemm mkl puts the experts on MKL too.
The optimizer is torch's Adam with fused=True by default, one kernel per parameter tensor on
CPU and GPU; --optimizer adam uses its per-tensor for-loop instead (several passes over every
parameter, like fairseq's own Adam on CPU), where the MoE's extra expert parameters cost more.
peak_rss_mb is the peak resident set of the whole run (all models, on CPU). --compare-env
THP_MEM_ALLOC_ENABLE=1 runs all of this in child processes with and without the setting,
interleaved, and prints medians and ratios instead (see benchmarks/bench_common.py).

    python benchmarks/bench_train.py                                   # random tokens
    python benchmarks/bench_train.py --data cache/data-bin --lang en   # real token stream
    python benchmarks/bench_train.py --device cuda --dtype bfloat16    # on a GPU, bf16 autocast
    python benchmarks/bench_train.py --compare-env THP_MEM_ALLOC_ENABLE=1 --env-rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_common import add_compare_env_arguments, child_env, compare_env, max_rss_mb  # noqa: E402
from xmoe.encoder import EncoderConfig, XMoEEncoder  # noqa: E402
from xmoe.moe import StackedExperts  # noqa: E402

# name -> (gate, gate_fn); all top-1, so every MoE model has the dense model's active size.
MOE_VARIANTS = {
    "xmoe": ("xmoe", "softmax"),
    "xmoe_sigmoid": ("xmoe", "sigmoid"),
    "switch": ("switch", "softmax"),
    "switch_sigmoid": ("switch_sigmoid", "sigmoid"),
}
PAD, BOS, EOS, MASK_FRACTION = 1, 0, 2, 0.15
AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # fp16 autocast would need a grad scaler
OPTIMIZERS = {"adam_fused": {"fused": True}, "adam": {"foreach": False}}  # torch.optim.Adam keyword arguments


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="encoder layers (default 4)")
    parser.add_argument("--dim", type=int, default=256, help="model dimension (default 256)")
    parser.add_argument("--ffn", type=int, default=1024, help="FFN width of the dense FFN and of each expert")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default 8)")
    parser.add_argument("--moe-freq", type=int, default=2, help="every k-th layer is an MoE layer (default 2)")
    parser.add_argument("--capacity-factor", type=float, default=1.0, help="training capacity factor")
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary size for random tokens")
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--models", default=",".join(MOE_VARIANTS), help=f"MoE variants among {list(MOE_VARIANTS)}")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per model (median reported)")
    parser.add_argument("--steps-per-window", type=int, default=3, help="training steps per window")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--data", help="binarized data folder (manifest.json) to take real token ids from")
    parser.add_argument("--lang", default="en", help="language of --data's monolingual train split")
    parser.add_argument(
        "--optimizer",
        choices=sorted(OPTIMIZERS),
        default="adam_fused",
        help="torch.optim.Adam, fused (default) or its per-tensor for-loop (adam)",
    )
    parser.add_argument(
        "--expert-gemm",
        choices=["default", "mkl"],
        default="default",
        help="default: the experts' float32 CPU GEMMs on oneDNN where available (StackedExperts.onednn_gemm); "
             "mkl: on torch's default, MKL, like every other layer of both models",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to train on (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(AUTOCAST_DTYPES), default="float32",
                        help="autocast dtype of the forward pass (float32 = off; default float32)")
    add_compare_env_arguments(parser)
    args = parser.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MOE_VARIANTS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(MOE_VARIANTS)}")
    return args


def token_stream(args) -> torch.Tensor:
    """A 1-D tensor of token ids to cut batches from (real data if --data, else uniform)."""
    generator = torch.Generator().manual_seed(args.seed)
    needed = args.batch * (args.seq_len - 1) * 4
    if not args.data:
        return torch.randint(4, args.vocab, (needed,), generator=generator)
    from fairseq.data import indexed_dataset

    prefix = os.path.join(args.data, "mono", args.lang, "train")
    if not indexed_dataset.MMapIndexedDataset.exists(prefix):
        sys.exit(f"bench_train.py: no binarized data at {prefix}.bin/.idx (see --data/--lang)")
    dataset = indexed_dataset.MMapIndexedDataset(prefix)
    pieces, total = [], 0
    for index in range(len(dataset)):
        pieces.append(dataset[index].long())
        total += len(pieces[-1])
        if total >= needed:
            break
    with open(os.path.join(args.data, "dict.txt"), encoding="utf-8") as handle:
        args.vocab = 4 + sum(1 for _ in handle) + 1  # specials + entries + <mask>
    return torch.cat(pieces)


def make_batches(stream: torch.Tensor, args, count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` (tokens (B, T), targets (B, T)) batches: <s> + a slice of the stream, 15% masked."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    mask_id = args.vocab - 1
    span = args.seq_len - 1
    batches = []
    for b in range(count):
        rows = stream[b * args.batch * span : (b + 1) * args.batch * span].view(args.batch, span)
        tokens = torch.cat([torch.full((args.batch, 1), BOS), rows], dim=1)
        masked = torch.rand(tokens.shape, generator=generator) < MASK_FRACTION
        masked[:, 0] = False
        targets = torch.where(masked, tokens, torch.full_like(tokens, PAD))
        batches.append((tokens.masked_fill(masked, mask_id), targets))
    return batches


def build_model(args, variant: str | None) -> XMoEEncoder:
    torch.manual_seed(args.seed)
    moe_layers = [] if variant is None else list(range(args.moe_freq - 1, args.layers, args.moe_freq))
    gate, gate_fn = MOE_VARIANTS[variant] if variant else ("xmoe", "softmax")
    cfg = EncoderConfig(
        vocab_size=args.vocab,
        padding_idx=PAD,
        encoder_layers=args.layers,
        encoder_embed_dim=args.dim,
        encoder_ffn_embed_dim=args.ffn,
        encoder_attention_heads=args.heads,
        moe_layer_indices=moe_layers,
        moe_experts=args.experts if variant else 0,
        max_positions=args.seq_len,
        moe_gate=gate,
        moe_gate_fn=gate_fn,
        moe_capacity_factor=args.capacity_factor,
    )
    model = XMoEEncoder(cfg).train()
    for module in model.modules():
        if isinstance(module, StackedExperts):
            module.onednn_gemm = args.expert_gemm == "default"
    return model


def train_step(model, optimizer, tokens, targets, autocast_dtype=None) -> None:
    masked = targets.ne(PAD)
    with torch.autocast(tokens.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits, extra = model(tokens, masked_tokens=masked)
    loss = F.cross_entropy(logits.float(), targets[masked])
    if extra["moe_aux"]:
        loss = loss + 0.01 * torch.stack([aux.balance_loss for aux in extra["moe_aux"]]).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.compare_env and not args.env_child:
        print(json.dumps(compare_env(__file__, argv, args.compare_env, args.env_rounds)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device, autocast_dtype = torch.device(args.device), AUTOCAST_DTYPES[args.dtype]
    batches = [(tokens.to(device), targets.to(device)) for tokens, targets in make_batches(token_stream(args), args)]
    names = ["dense"] + args.models.split(",")
    models = {name: build_model(args, None if name == "dense" else name).to(device) for name in names}
    optimizers = {
        name: torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), **OPTIMIZERS[args.optimizer])
        for name, model in models.items()
    }

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels run asynchronously: wait before reading the clock

    def run(name: str, steps: int, offset: int) -> float:
        synchronize()
        start = time.perf_counter()
        for step in range(steps):
            tokens, targets = batches[(offset + step) % len(batches)]
            train_step(models[name], optimizers[name], tokens, targets, autocast_dtype)
        synchronize()
        return time.perf_counter() - start

    for name in names:
        run(name, args.warmup, 0)
    tokens_per_window = args.steps_per_window * args.batch * args.seq_len
    wps = {name: [] for name in names}
    for window in range(args.windows):
        for name in names:
            wps[name].append(tokens_per_window / run(name, args.steps_per_window, window))

    dense_wps = statistics.median(wps["dense"])
    result = {
        "dense": {"wps": round(dense_wps, 1), "params": sum(p.numel() for p in models["dense"].parameters())},
        "models": {
            name: {
                "wps": round(statistics.median(wps[name]), 1),
                "ratio_vs_dense": round(statistics.median(wps[name]) / dense_wps, 3),
                "params": sum(p.numel() for p in models[name].parameters()),
            }
            for name in names[1:]
        },
        "config": {
            k: getattr(args, k)
            for k in ("layers", "dim", "ffn", "heads", "experts", "moe_freq", "capacity_factor", "batch", "seq_len",
                      "windows", "steps_per_window", "vocab")
        },
        "data": args.data or "random",
        "optimizer": args.optimizer,
        "expert_gemm": args.expert_gemm,
        "onednn": any(
            experts.grouped_uses_onednn(torch.empty(0, device=device))
            for model in models.values() for experts in model.modules() if isinstance(experts, StackedExperts)
        ),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peak_rss_mb": round(max_rss_mb(), 1),
        "load_average": round(os.getloadavg()[0], 2),
    }
    if args.env_child:
        result["env"] = child_env(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
