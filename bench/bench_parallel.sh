#!/bin/sh
# Multi-GPU layouts through the normal trainer (issue 5), every variant in one call, synthetic tokens,
# no checkpoints: the full Llama 3.1 8B (32 layers) at sequence 8192 under FSDP, and an 8B-shaped
# proxy under TP=2 (+ sequence parallel) and CP=2 for comparison with FSDP on the same proxy.
#   sh bench/bench_parallel.sh OUT [NPROC]        # NPROC defaults to 2 (nvidia-h200-x2)
# Each run's metrics.jsonl (tokens/s/GPU, TFLOP/s/GPU, MFU, per-rank peak memory) lands in OUT/NAME/.
set -e
out=$1
n=${2:-2}
run() {
    name=$1; shift
    echo "=== $name"
    python -m llamatron train --config demo --nproc-per-node "$n" --set data.mock=true --set data.seq_len=8192 \
        --set model.size=llama3.1-8b --set train.compile=true --set train.attention_backend=cudnn \
        --set train.log_every=2 --set eval.samples=0 --set eval.at_start=false --set checkpoint.enabled=false \
        --set optim.warmup_steps=2 --set optim.lr=1e-4 --set optim.min_lr=1e-5 \
        --set train.out_dir="$out/$name" "$@" 2>&1 | grep -E "^step|memory estimate|layout:|model llama|Error|error" || true
}
# Full 8B, FSDP over all GPUs: 115 GiB/rank estimated without activation checkpointing on 2 ranks.
run fsdp-8b-full --set train.steps=8 --set train.global_batch_size=$((4 * n)) --set train.micro_batch_size=1
# 8 layers of the 8B shape: FSDP, TP (+SP), CP, same global batch.
run fsdp-proxy --set model.n_layers=8 --set train.steps=8 --set train.global_batch_size=8 --set train.micro_batch_size=1
run tp2-proxy --set model.n_layers=8 --set parallel.tp=2 --set parallel.dp_shard=$((n / 2)) \
    --set train.steps=8 --set train.global_batch_size=8 --set train.micro_batch_size=1
run cp2-proxy --set model.n_layers=8 --set parallel.cp=2 --set train.attention_backend=flash --set parallel.dp_shard=$((n / 2)) \
    --set train.steps=8 --set train.global_batch_size=8 --set train.micro_batch_size=1
