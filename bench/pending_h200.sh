#!/bin/bash
# The H200 measurements the code of 2026-12-04 is waiting for, in priority order, in one device call:
# each run gets what is left of a time budget, and its log and JSON go to OUT (default ./h200-runs).
#
#   bash bench/pending_h200.sh 560 [OUT]      # 560 s in all; carry lm-eval's wheels (docs/performance.md)
#
# 1. issue 19: zero-shot scoring, the shipped fast path against lm-eval's HF backend (8B, GPT-126M)
# 2. issue 20: LoRA (rank 32, all linears) and full SFT of the 8B at seq 4096, packed
# 3. issue 21: GLaM 126M-64E with static capacity routing and flex relative bias, eager and compiled;
#    then the 64B-64E layer proxy (2 blocks, 8 experts: one GPU's share at ep 8, docs/moe.md)
# 4. issue 18: the LLaMA-2 7B proxy at micro 8 and 16
# 5. issue 23: the 8B proxy at micro 16, which the planner now ranks first (never measured)
TOTAL=${1:-560}
OUT=${2:-${OUT:-h200-runs}}
mkdir -p "$OUT"
T0=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
run() {  # run NAME CAP MIN COMMAND...: at most CAP seconds, skipped when fewer than MIN are left
    local name=$1 cap=$2 min=$3 r; shift 3
    r=$(left); [ "$r" -gt "$cap" ] && r=$cap
    if [ "$r" -lt "$min" ]; then echo "$name: skipped ($(left) s left)"; return; fi
    timeout "$r" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $? ($(left) s left)"
}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
run zs8b 175 120 python bench/bench_zero_shot.py --size llama3.1-8b --requests 2000 --batch-sizes 32,128 --json "$OUT/zs8b.json"
run zsgpt 75 40 python bench/bench_zero_shot.py --size gpt-126m --requests 4000 --batch-sizes 32,128 --json "$OUT/zsgpt.json"
run finetune 250 120 python bench/bench_finetune.py --variants lora+compile@micro=2,sft+compile+ac@micro=1,lora@micro=2 \
    --steps 4 --warmup 2 --budget-s 200 --json "$OUT/finetune.json"
run glam 150 90 python bench/bench_train_step.py --size glam-126m-64e --layers 0 --seq-len 2048 --micro-batch 8 \
    --global-batch 32 --variants fused-ce+adam,compile --profile compile --steps 4 --warmup 2 --json "$OUT/glam.json"
run glam64proxy 120 90 python bench/bench_train_step.py --size glam-64b-64e --layers 2 --set model.n_experts=8 \
    --seq-len 2048 --micro-batch 2 --global-batch 8 --variants compile --steps 3 --warmup 2 --json "$OUT/glam64proxy.json"
run llama2 150 80 python bench/bench_train_step.py --model llama2-7b --layers 4 --seq-len 4096 --global-batch 32 \
    --steps 4 --warmup 2 --variants compile+cudnn@micro=16,compile+cudnn@micro=8 --json "$OUT/llama2.json"
run l8b_mbs16 120 70 python bench/bench_train_step.py --layers 4 --seq-len 8192 --global-batch 16 --micro-batch 16 \
    --steps 3 --warmup 2 --variants compile+cudnn --json "$OUT/l8b_mbs16.json"
grep -h "SUMMARY\|out of memory\|Error" "$OUT"/*.log | cut -c1-400
