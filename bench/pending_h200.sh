#!/bin/bash
# The H200 measurements the code is waiting for (state of 2026-12-05), in priority order, in one device
# call: each run gets what is left of a time budget, and its log and JSON go to OUT (default ./h200-runs),
# packed at the end into OUT.tgz (a device call returns a few files, not a folder of them).
#
#   bash bench/pending_h200.sh 560 /tmp/runs && cp /tmp/runs.tgz $OUT/   # carry lm-eval's wheels (docs/performance.md)
#   SKIP=zs8b,finetune bash bench/pending_h200.sh 560 /tmp/runs           # a second call: the runs the first did not reach
#   ONLY=calibrate bash bench/pending_h200.sh 150 /tmp/runs               # just these
#
# Together they need more than one call's 600 s: the first call runs what fits, in this order.
# Measured on 2026-12-05 and no longer here: the CUDA tests of the fused loss and the staging buffers,
# full SFT of the 8B, the GLaM 64B-64E proxy, LLaMA-2 at global batch 32, the 8B proxy at micro 16 in BF16.
# Measured on an H100 on 2026-12-05 (docs/performance.md; still wanted on the H200, which the issues name):
# zs8b, zsgpt, LoRA at micro 2 (bf16 and FP8), glam, glamattn, ckpt, castonce; fp8experts_test ran with
# two failures since fixed (a test's CPU tensor; cuDNN + band, since removed).
#
# 1. issue 19: zero-shot scoring of the 8B, the shipped fast path (eager, compiled, and with --fp8: its
#    block linears from FP8 copies) against lm-eval's HF backend (the 2x target waits on these rows)
# 2. issue 20: LoRA (rank 32, all linears; bf16 and FP8 base layers, micro 2 and 4; BF16 micro 2 profiled: where
#    the 4x target's missing 13% goes) of the 8B at seq 4096, packed by
#    best fit (the default since 2026-12-05)
# 3. issue 21: GLaM 126M-64E with static capacity routing and flex relative bias (64-key tiles), eager
#    and compiled, profiled, each with its MoE layer split into experts and routing/dispatch/combine; its
#    experts in FP8 (torchao's rowwise grouped GEMM), alone and with the 768-wide linears, after the CUDA
#    tests of that GEMM and of the band's tensor-core products; then its attention alone: SDPA with the
#    bias, flex with the band (tensor-core and fp32 band products), flex with atomics, against causal
#    SDPA without bias (the floor)
# 4. issue 22: the first async checkpoint save, its host buffers allocated in the background
# 5. issue 22: the block linears' bf16 copies made once per step (train.cast_weights_once), and with
#    the fp32 weight-gradient accumulation inside the GEMM (train.gradient_accumulation_fusion), against
#    autocast's cast and add per micro-batch, in one process: the 8-layer 8B proxy at micro 2 (issue
#    22's 68% target; measured only on an H100 before, 61.0%), 4 micro-batches per step
# 6. issue 23: a new H200 calibration table (attention timed in windows at three call sizes; GLaM's
#    experts as one batched GEMM and its attention as flex runs it, compiled), for
#    llamatron/calibration/h200.json: the GPT-126M and GLaM rows of docs/planner.md wait for it
# 7. issue 19: GPT-126M's scoring rows (eager already over 2x on 2026-12-05: the compiled row to add)
# 8. issue 23: the 8B proxy at micro 16 in FP8 everywhere (the planner's first choice with FP8)
TOTAL=${1:-560}
OUT=${2:-${OUT:-h200-runs}}
mkdir -p "$OUT"
T0=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
run() {  # run NAME CAP MIN COMMAND...: at most CAP seconds, skipped when fewer than MIN are left
    local name=$1 cap=$2 min=$3 r; shift 3
    case ",${SKIP:-}," in *",$name,"*) echo "$name: skipped (SKIP)"; return;; esac
    if [ -n "${ONLY:-}" ]; then case ",$ONLY," in *",$name,"*) ;; *) return;; esac; fi
    r=$(left); [ "$r" -gt "$cap" ] && r=$cap
    if [ "$r" -lt "$min" ]; then echo "$name: skipped ($(left) s left)"; return; fi
    timeout "$r" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $? ($(left) s left)"
}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
run zs8b 230 120 python bench/bench_zero_shot.py --size llama3.1-8b --requests 2000 --batch-sizes 32,128 --fp8 --json "$OUT/zs8b.json"
run finetune 240 100 python bench/bench_finetune.py --variants lora+compile@micro=2,lora+compile+fp8@micro=2,lora+compile@micro=4,lora+compile+fp8@micro=4 \
    --steps 4 --warmup 2 --budget-s 220 --profile lora+compile@micro=2 --json "$OUT/finetune.json"
run fp8experts_test 60 30 python -m pytest -q -p no:cacheprovider tests/test_glam_fp8.py \
    tests/test_glam.py::test_table_grad_from_tensor_core_band_products_equals_fp32_on_cuda \
    tests/test_glam.py::test_band_corrected_attention_with_cudnn_on_cuda
# Global batch 128 (16 micro-batches): the fused AdamW over 1.9B parameters (~37 ms) is paid once a step,
# as at Pax's 256, not once per 4 micro-batches. Eager last: it is the slowest and the least asked for.
run glam 300 120 python bench/bench_train_step.py --size glam-126m-64e --layers 0 --seq-len 2048 --micro-batch 8 \
    --global-batch 128 --variants compile,compile+fp8-experts,compile+fp8-768,fused-ce+adam \
    --profile compile \
    --steps 3 --warmup 2 --json "$OUT/glam.json"
run glamattn 150 60 python bench/bench_glam_attention.py
run ckpt 150 100 python bench/bench_checkpoint.py --layers 2 --seq-len 8192 --saves 2 --modes async \
    --json "$OUT/ckpt.json"
run castonce 240 150 python bench/bench_train_step.py --layers 8 --seq-len 8192 --global-batch 8 --micro-batch 2 \
    --steps 4 --warmup 2 --variants compile+cudnn,compile+cudnn+castonce,compile+cudnn+castonce+fusedwgrad \
    --profile compile+cudnn+castonce+fusedwgrad --json "$OUT/castonce.json"
run calibrate 170 90 python -m llamatron plan --calibrate --out "$OUT/h200.json" --budget-s 140
run zsgpt 75 40 python bench/bench_zero_shot.py --size gpt-126m --requests 4000 --batch-sizes 32,128 --json "$OUT/zsgpt.json"
run l8b_mbs16_fp8 120 70 python bench/bench_train_step.py --layers 4 --seq-len 8192 --global-batch 16 --micro-batch 16 \
    --steps 3 --warmup 2 --variants compile+fp8-all --json "$OUT/l8b_mbs16_fp8.json"
grep -h "SUMMARY\|MoE layer\|forward + backward\| vs sdpa\|^wrote \|prealloc:\|passed\|failed\|out of memory\|Error" "$OUT"/*.log 2>/dev/null | cut -c1-900
tar czf "$OUT.tgz" -C "$(dirname "$OUT")" "$(basename "$OUT")"
