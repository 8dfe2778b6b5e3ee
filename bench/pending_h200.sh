#!/bin/bash
# The H200 measurements the code is waiting for (state of 2026-12-07, 21:00 UTC), in
# the order that decides the most, in one device call: each run gets what is left of a time budget, and
# its log and JSON go to OUT (default ./h200-runs), packed at the end into OUT.tgz (a device call returns a
# few files, not a folder of them).
#
#   bash bench/pending_h200.sh 540 $OUT/runs        # with .whl carried: installed first (below)
#   SKIP=glam,calibrate bash bench/pending_h200.sh 540 $OUT/runs    # a second call: the runs the first did not reach
#   ONLY=calibrate,zs8b bash bench/pending_h200.sh 300 $OUT/runs    # just these
#
# The device image lacks lm-eval (the HF backend's side), dill and torchao: fetched here into .whl (git
# ignores it) by `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation
# cp --platform manylinux_2_28_x86_64 --platform any -d .whl lm_eval==0.4.13 dill torchao==0.17.0`, carried.
#
# Measured on 2026-12-06 21:58-22:23 (docs/performance.md, "Measured on 2026-12-06, 21:58-22:23 UTC", one H200):
# sbs (BF16 1.005x TorchTitan, FP8 micro 4 1.354x TorchTitan's FP8, FP8 1.48x BF16 at micro 8), ctune and
# ctune_l8 (train.compile_tuning: FP8 micro 8 -0.6 to -1.2%, BF16 and FP8 micro 4 nothing), fp8experts_test
# (passed), calibrate (its table ranked micro 4 first: not shipped, docs/bench/h200_calibration_not_shipped.json).
# Earlier: "Measured on 2026-12-06, 08:22-08:48 UTC" (glamkernels, l8b_mbs16, the H100's calibrate). Left, in order:
# 000. Next (2026-12-07 21:00; that session got no GPU), three calls on one warm H200 (BF16 at micro 8 needs it):
#    `ONLY=fastaccum_test,fastaccum_gemms bash bench/pending_h200.sh 280 $OUT/runs` (~4 min), `ONLY=fastaccum ... 590`
#    (~10 min), `ONLY=fastaccum_conv ... 590` (~8 min, .devdata carried too); the items' comment below says what they
#    decide. Then l8b_mbs16 (item 00) and, with a new FP8 default, sbs again.
#    2026-12-07 22:24-00:40: one call of twenty got a machine (an H100): fastaccum_test then passed but for a
#    norm's gradient (a sum inductor splits as each graph suggests; the test now allows a bf16 step there) and
#    fastaccum_gemms ran out of memory (its operands are now drawn a slab at a time); nothing was timed. On an
#    H100 (FP8 at micro 8 fits, BF16 does not), a shorter call decides whether it pays at all: the fastaccum
#    item's three FP8 variants alone (~5 min).
# 00. Done 2026-12-07 17:35-17:55 on an H200 (docs/performance.md, "Measured on 2026-12-07, 17:35-17:55 UTC"):
#    item 1 (sbs: BF16 1.015x TorchTitan, FP8 micro 4 1.381x TorchTitan's FP8, FP8 micro 8 1.491x BF16), outer
#    (FP8 with cast-once -0.5%, the 8-layer proxy -0.6 to -1.5%, BF16 micro 8 within noise), bf16loss_test and
#    bf16loss (the BF16 loss's Triton kernels -0.6%: the default since). Next, in one call (~9 min, .whl carried):
#    `ONLY=l8b_mbs16 bash bench/pending_h200.sh 560 $OUT/runs`: FP8 at micro 16 (one micro-batch a step, so
#    without cast-once) beside BF16 and FP8 at micro 8, for issue 22's 1.5x; then the FA4 halves (below) and sbs.
# 0. Done 2026-12-07 13:09-13:16 on an H200 (docs/performance.md, "Measured on 2026-12-07, 13:09-13:16 UTC"):
#    FP8's default 1.502x BF16 on the medians (1.489-1.513x pair by pair); FP8 weights cast once per step
#    (`@castonce=1`) 0.25% slower at micro 8, opt-in. `ONLY=fp8castonce_test,fp8castonce` (~8 min) times it at
#    micro 8 and 4 again (micro 4 not yet measured) and runs its CUDA test; `FP8_OPTS=@ctune=1@castonce=1`
#    would give the side by side's FP8 runs it.
# 1. Done 2026-12-07 17:35 (item 00); as it was asked for (state of 2026-12-07 13:20):
#    `ONLY=sbs bash bench/pending_h200.sh 585 $OUT/runs` on an H200, alone in
#    its call (the tuning adds ~200 s of compile; ~10 min), carrying .whl and .peers: the side by side with
#    the FP8 default of 09:30 (train.compile_tuning on for FP8, the logits' GEMM fast-accumulated), so that
#    both of issue 22's FP8 ratios (1.5x BF16, 1.35x TorchTitan's FP8) come from one run, with TorchTitan's
#    BF16 beside them again.
#    Done at 09:21 on an H100 (docs/performance.md, "Measured on 2026-12-07, 09:21-09:28"): the 2,000-step
#    convergence of that FP8 default, `bash bench/fp8_default_convergence.sh $OUT/conv` (-0.88% / -1.18%).
# 1b. issue 22: BF16 and FP8 at micro 16 as the side by side runs them (l8b_mbs16, ~4 min): on the code of
#    2026-12-05 FP8 ran 2% faster at micro 16 than at 8, and micro 16 is the planner's first choice
# 2. issue 19: the 8B's scoring with the batches padded to their longest row (the default since 06:55)
#    beside the 8-token alignment it replaced, in one process (zs8b); GPT 126M's scoring again (zsgpt)
# 3. issue 22: an async save (ckpt); the calibration again on a cool GPU (calibrate)
# 4. issue 21: GLaM's attention alone, every way in one process; issue 20: LoRA of the 8B at seq 4096
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
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# FlashAttention 4 (flash-attn-4 and NVIDIA's CuTe DSL, 69 MB as xz: more than one call carries): an
# earlier call on the same warm machine left the first half in /tmp (`cp .fa4a/fa4part.aa /tmp/`, carrying
# .fa4a), this one carries .fa4b. How the halves are made: docs/performance.md ("Measured on 2026-12-06,
# 17:01-17:33"). Where it is there, the side by side also runs llamatron on FA4 (`@sdpa=fa4`).
if [ -f /tmp/fa4part.aa ] && [ -f .fa4b/fa4part.ab ]; then
    mkdir -p /tmp/fa4site && cat /tmp/fa4part.aa .fa4b/fa4part.ab | xz -dc -T8 | tar xf - -C /tmp/fa4site \
        && export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
HAVE_FA4=$(python3 -c "import flash_attn.cute.interface" > /dev/null 2>&1 && echo 1)
FA4_VARIANTS=${HAVE_FA4:+,compile+cudnn+castonce+fusedwgrad@micro=8@res=bf16@sdpa=fa4,compile+fp8-all@micro=8@res=bf16@sdpa=fa4@ctune=1@castonce=1@fusedwgrad=1}
SDPA=${HAVE_FA4:+@sdpa=fa4}  # the tuned runs on the faster attention where it is there
# An H100 (80 GB) cannot hold BF16 at micro 8: there the BF16 row of item 1 runs at micro 4.
BF16_STEP=compile+cudnn+castonce+fusedwgrad@res=bf16
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | grep -q H100 && BF16_STEP=$BF16_STEP@micro=4
# The embedding and output layer in cast-once's buffers and copies (transforms/outer_weights.py, `@outer=0` without
# them) on this GPU: BF16 at micro 8 and the 8-layer proxy at micro 2, FP8 with cast-once against the default.
V=compile+cudnn+castonce+fusedwgrad@res=bf16 F=compile+fp8-all@res=bf16
# Issue 22, new on 2026-12-07 at 20:00-21:00 and not yet run (no GPU came): the FP8 gradients' GEMMs fast-accumulated
# (train.fp8_fast_accum: the input gradients', and all three) and the fused SwiGLU (its down projection handed h in
# FP8, its weights cast once), against the FP8 default and BF16 at micro 8 in one process (~9 min, .whl carried);
# then the 2,000-step convergence of the two fast-accumulated recipes (~8 min, .whl and .devdata/tokenizer.model
# carried; its folder comes back inside OUT.tgz).
F8=$F@ctune=1@castonce=1@fusedwgrad=1  # the trainer's FP8 default
run fastaccum_test 120 60 python -m pytest -q -p no:cacheprovider tests/test_fp8_swiglu.py tests/test_fp8_weight_cast.py -k cuda
run fastaccum_gemms 150 60 python bench/bench_gemm_tuning.py --rows 65536 --precisions fp8 --against fast-accum \
    --json "$OUT/fastaccum_gemms.json"
run fastaccum 575 400 python bench/bench_train_step.py --layers 4 --seq-len 8192 --global-batch 16 --micro-batch 8 --steps 4 \
    --warmup 2 --variants $F8@fastaccum=output+grad_input+grad_weight,$V,$F8,$F8@fastaccum=output+grad_input,$F8@swiglu=1 \
    --json "$OUT/fastaccum.json"
run fastaccum_conv 580 450 env RUNS="fp8_fast_grad_input fp8_fast_all" bash bench/fp8_default_convergence.sh "$OUT/conv"
run outer_test 90 40 python -m pytest -q -p no:cacheprovider tests/test_outer_weights.py tests/test_fp8_weight_cast.py -k "cuda or keeps"
run outer 560 400 bash -c "python bench/bench_train_step.py --layers 4 --seq-len 8192 --global-batch 16 --micro-batch 8 --steps 4 \
    --warmup 2 --variants $V,$V@outer=0,$F@castonce=1@fusedwgrad=1,$F,$V@sdpa=cudnn,$V@outer=0@sdpa=cudnn --json $OUT/outer.json; \
    python bench/bench_train_step.py --layers 8 --seq-len 8192 --global-batch 8 --micro-batch 2 --steps 4 --warmup 2 \
    --variants $V@outer=0,$V,$V@outer=0@sdpa=cudnn,$V@sdpa=cudnn --json $OUT/outer_l8.json"
# The BF16 loss's gradient from llamatron/loss_kernels.py's kernels (loss.BF16_LOSS_KERNELS, `@bf16loss=triton`)
# against inductor's (the default): its CUDA test, then the BF16 step at micro 8 A B A B.
run bf16loss_test 60 30 python -m pytest -q -p no:cacheprovider tests/test_loss_kernels.py
run bf16loss 330 240 python bench/bench_train_step.py --layers 4 --seq-len 8192 --global-batch 16 --micro-batch 8 --steps 4 \
    --warmup 2 --variants $V@bf16loss=triton,$V,$V@bf16loss=triton@sdpa=cudnn,$V@sdpa=cudnn --json "$OUT/bf16loss.json"
run fp8castonce_test 120 60 python -m pytest -q -p no:cacheprovider tests/test_fp8_weight_cast.py -k "cuda or trainer"
run fp8castonce 440 300 python bench/bench_train_step.py --layers 4 --seq-len 8192 --global-batch 16 --micro-batch 8 --steps 4 \
    --warmup 2 --variants compile+fp8-all@res=bf16@castonce=1@fusedwgrad=1,compile+fp8-all@res=bf16,compile+fp8-all@res=bf16@castonce=1,compile+fp8-all@res=bf16@micro=4,compile+fp8-all@res=bf16@micro=4@castonce=1@fusedwgrad=1 \
    --json "$OUT/fp8castonce.json"
run swiglu_test 90 30 python -m pytest -q -p no:cacheprovider tests/test_fp8_swiglu.py tests/test_fp8.py \
    tests/test_triton_kernels_compile.py -k "cuda or tracks_the_exact or hardware or statistics"
# The step first (what decides the default), the kernels after it with what is left.
run swiglu 330 240 python bench/bench_train_step.py --layers 4 --seq-len 8192 --global-batch 16 --micro-batch 8 --steps 4 \
    --warmup 2 --variants compile+fp8-all@res=bf16@swiglu=1,compile+fp8-all@res=bf16,compile+fp8-all@res=bf16@fp8loss=arith,$BF16_STEP \
    --profile compile+fp8-all@res=bf16@swiglu=1 --json "$OUT/swiglu.json"
run swiglu_rev 300 200 python bench/bench_train_step.py --layers 4 --seq-len 8192 --global-batch 16 --micro-batch 8 --steps 4 \
    --warmup 2 --variants $BF16_STEP,compile+fp8-all@res=bf16@fp8loss=arith,compile+fp8-all@res=bf16,compile+fp8-all@res=bf16@swiglu=1 \
    --json "$OUT/swiglu_rev.json"
run swiglu_kernels 90 60 python bench/bench_fp8_swiglu.py --repeats 10 --json "$OUT/swiglu_kernels.json"
# The FP8 loss's gradient tile timed per shape (loss_kernels.TUNE_GRAD, 2026-12-07) against the fixed tilings.
run loss_kernels 90 40 python bench/bench_fp8_loss.py --tiles 64x128x4096,32x256x4096 --repeats 10 \
    --json "$OUT/loss_kernels.json"
run zs8b 250 120 python bench/bench_zero_shot.py --size llama3.1-8b --requests 2000 --batch-sizes 32,128 --fp8 rowwise+pad8,rowwise --profile \
    --json "$OUT/zs8b.json"
run zsgpt 75 40 python bench/bench_zero_shot.py --size gpt-126m --requests 4000 --batch-sizes 32,128 --json "$OUT/zsgpt.json"
run fp8loss 330 240 python bench/bench_train_step.py --layers 4 --seq-len 8192 --global-batch 16 --micro-batch 8 --steps 4 \
    --warmup 2 --variants compile+cudnn+castonce+fusedwgrad,compile+fp8-all,compile+fp8-all@micro=16,compile+fp8-all@micro=4,compile+cudnn+castonce+fusedwgrad@res=bf16,compile+fp8-all@res=bf16 \
    --json "$OUT/fp8loss.json"
[ -d .peers/torchtitan ] && EXTRA_VARIANTS=compile+fp8-all@micro=8@res=bf16${FP8_OPTS:-@ctune=1@castonce=1@fusedwgrad=1}$FA4_VARIANTS \
    run sbs 585 420 bash bench/side_by_side.sh "$OUT/sbs" 8 4
# train.compile_tuning (`@ctune=1`, ~100 s more compile a variant) on both sides, the untuned BF16 again after them:
# the FP8 / BF16 ratio with the tuning, and the 8-layer proxy's micro 2 (issue 22's 68%) with it.
run ctune 400 300 python bench/bench_train_step.py --layers 4 --seq-len 8192 --global-batch 16 --micro-batch 8 --steps 4 \
    --warmup 2 --variants compile+cudnn+castonce+fusedwgrad@res=bf16$SDPA@ctune=1,compile+fp8-all@res=bf16$SDPA@ctune=1,compile+cudnn+castonce+fusedwgrad@res=bf16$SDPA \
    --json "$OUT/ctune.json"
run ctune_l8 200 150 python bench/bench_train_step.py --layers 8 --seq-len 8192 --global-batch 8 --micro-batch 2 --steps 4 \
    --warmup 2 --variants compile+cudnn+castonce+fusedwgrad@res=bf16$SDPA@ctune=1 --json "$OUT/ctune_l8.json"
run fp8experts_test 90 30 python -m pytest -q -p no:cacheprovider tests/test_glam_fp8.py \
    tests/test_glam.py -k "on_cuda or as_close_to_fp32 or one_after_another"
run ckpt 150 100 python bench/bench_checkpoint.py --layers 2 --seq-len 8192 --saves 2 --modes async \
    --json "$OUT/ckpt.json"
run glamattn 150 50 python bench/bench_glam_attention.py --quick --profile "split_triton, compiled"
run finetune 240 100 python bench/bench_finetune.py --variants lora+compile@micro=2,lora+compile+fp8@micro=2,lora+compile@micro=4,lora+compile+fp8@micro=4 \
    --steps 4 --warmup 2 --budget-s 220 --profile lora+compile@micro=2 --json "$OUT/finetune.json"
# The calibration times GLaM's biased attention with each kernel its blocks can run, the default first.
run calibrate 190 120 python -m llamatron plan --calibrate --out "$OUT/calibration.json" --budget-s 170
# GLaM 126M with each attention kernel on this tree's code, in one process (issue 23's rows per kernel).
run glamkernels 330 200 python bench/bench_train_step.py --size glam-126m-64e --layers 0 --seq-len 2048 --micro-batch 16 \
    --global-batch 128 --variants compile+castonce+fusedwgrad@attn=split_triton,compile+castonce+fusedwgrad@attn=split_cudnn,compile+castonce+fusedwgrad@attn=split,compile+castonce+fusedwgrad@attn=flex \
    --steps 3 --warmup 2 --json "$OUT/glamkernels.json"
# The per-kernel rows at other micro-batches (out of sample for the step), the fastest and slowest kernels.
run glamkernels_mb 330 200 python bench/bench_train_step.py --size glam-126m-64e --layers 0 --seq-len 2048 --micro-batch 8 \
    --global-batch 128 --variants compile+castonce+fusedwgrad@attn=split_triton,compile+castonce+fusedwgrad@attn=flex,compile+castonce+fusedwgrad@attn=split_triton@micro=32,compile+castonce+fusedwgrad@attn=flex@micro=32 \
    --steps 3 --warmup 2 --json "$OUT/glamkernels_mb.json"
# Issue 22: FP8 at micro 16 (the planner's first choice for FP8; one micro-batch a step) beside BF16 and FP8 at micro 8,
# FP8 as the trainer runs it by default (`@ctune=1`; with several micro-batches cast-once and the fused weight gradients too).
run l8b_mbs16 540 360 python bench/bench_train_step.py --layers 4 --seq-len 8192 --global-batch 16 --micro-batch 16 \
    --steps 4 --warmup 2 --variants compile+cudnn+castonce+fusedwgrad@res=bf16@micro=8,compile+fp8-all@res=bf16@ctune=1,compile+fp8-all@res=bf16@micro=8@ctune=1@castonce=1@fusedwgrad=1 \
    --json "$OUT/l8b_mbs16.json"
run glam 240 100 python bench/bench_train_step.py --size glam-126m-64e --layers 0 --seq-len 2048 --micro-batch 16 \
    --global-batch 128 --variants compile+castonce+fusedwgrad@attn=split_triton,compile+castonce+fusedwgrad@attn=split_triton@micro=32 \
    --steps 3 --warmup 2 --json "$OUT/glam.json"
run castonce 240 150 python bench/bench_train_step.py --layers 8 --seq-len 8192 --global-batch 8 --micro-batch 2 \
    --steps 4 --warmup 2 --variants compile+cudnn,compile+cudnn+castonce,compile+cudnn+castonce+fusedwgrad \
    --json "$OUT/castonce.json"
run mk 330 200 python bench/bench_train_step.py --layers 4 --seq-len 8192 --global-batch 16 --steps 4 --warmup 2 \
    --variants compile+cudnn@micro=8,compile+cudnn@micro=8@mk=1,compile+fp8-all@micro=4,compile+fp8-all@micro=4@mk=1 \
    --json "$OUT/mk.json"
grep -h "^ROW\|^TITAN\|FP8\|^split\|^way\|SUMMARY\|MoE layer\|forward + backward\| vs sdpa\|as close to fp32\|profile of one call\|^wrote \|prealloc:\|passed\|failed\|out of memory\|Error" "$OUT"/*.log 2>/dev/null | cut -c1-900
tar czf "$OUT.tgz" -C "$(dirname "$OUT")" "$(basename "$OUT")"
