#!/bin/bash
# Session 5 measurements for #13 at commit $(git rev-parse --short HEAD); one after another, nothing else on the CPU.
cd /work/main
out=/work/exp/s5/measure
mkdir -p $out
git rev-parse HEAD > $out/commit
for run in 1 2 3; do
  for gate in xmoe switch; do
    .venv/bin/python benchmarks/bench_moe_layer.py --threads 2 --gate $gate --compare-padded --compare-dropless >> $out/layer_t2.jsonl
  done
done
for run in 1 2 3; do
  .venv/bin/python benchmarks/bench_train.py --threads 2 >> $out/train_t2.jsonl
  .venv/bin/python benchmarks/bench_train.py --threads 1 >> $out/train_t1.jsonl
done
for run in 1 2; do
  for gate in xmoe switch; do
    .venv/bin/python benchmarks/bench_moe_layer.py --threads 1 --gate $gate --compare-padded --compare-dropless >> $out/layer_t1.jsonl
  done
done
echo done > $out/DONE
