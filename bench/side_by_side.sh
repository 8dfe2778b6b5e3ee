#!/bin/bash
# llamatron and TorchTitan v0.2.2 on the same workload, in one device call (issue 22's table): 4 layers of
# the Llama 3.1 8B shape, seq 8192, global batch 16, synthetic tokens, BF16 and FP8 tensorwise.
#
#   bash bench/side_by_side.sh OUT [BF16_MICRO] [FP8_MICRO]      # defaults: 8 and 4 (one H200)
#   bash bench/side_by_side.sh $OUT 4 2                          # an 80 GB H100: TorchTitan's BF16 micro 8
#                                                                # (101 GiB) and FP8 micro 4 (95.5) do not fit
# Needs the peer harness copied into the checkout (it is not carried otherwise) and, for FP8, torchao:
#   echo /.peers/ >> .git/info/exclude; mkdir -p .peers; cp -r ../shared/peers/torchtitan .peers/
# llamatron's variants (with the trainer's defaults: the bf16 residual stream, and for FP8 the tuned compile,
# `@ctune=1`, train.compile_tuning's default with FP8 since 2026-12-07; both with the same opt-in knobs,
# train.cast_weights_once and train.gradient_accumulation_fusion, `castonce+fusedwgrad` / `@castonce=1@fusedwgrad=1`,
# so that only train.fp8 differs between them (since 2026-12-07 15:00: they pay in FP8 too once the embedding
# and output layer join them, docs/performance.md); EXTRA_VARIANTS adds others, e.g. NAME@sdpa=fa4 where
# flash-attn-4 is installed; FP8_OPTS replaces the FP8 variant's options) run in one process (bench/bench_train_step.py, medians of its timed steps); each
# TorchTitan run is its own process (run.sh), read as the mean `tps` of its steps 6-10 (its README).
# TorchTitan counts FLOPs as llamatron does (81.90 TFLOP a sequence), so its `mfu` compares directly.
set -u
OUT=${1:?OUT folder}; BF16_MICRO=${2:-8}; FP8_MICRO=${3:-4}
PEER=${PEER:-.peers/torchtitan}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
python bench/bench_train_step.py --layers 4 --seq-len 8192 --global-batch 16 --steps 4 --warmup 2 \
    --variants "compile+cudnn+castonce+fusedwgrad@micro=$BF16_MICRO@res=bf16,compile+fp8-all@micro=$FP8_MICRO@res=bf16${FP8_OPTS:-@ctune=1@castonce=1@fusedwgrad=1}${EXTRA_VARIANTS:+,$EXTRA_VARIANTS}" \
    --json "$OUT/llamatron.json" > "$OUT/llamatron.log" 2>&1
echo "llamatron: exit $?"
FP8="--model.converters quantize.linear.float8 --quantize.linear.float8.recipe_name tensorwise"
for run in "bf16 $BF16_MICRO" "fp8 $FP8_MICRO"; do
    set -- $run
    extra="--training.global-batch-size 16"; [ "$1" = fp8 ] && extra="$extra $FP8"
    (cd "$PEER" && STEPS=10 EXTRA="$extra" bash run.sh "$2") > "$OUT/titan_$1.log" 2>&1
    echo "titan $1 micro $2: exit $?"
done
grep -h "SUMMARY" "$OUT/llamatron.log" | cut -c1-400
for precision in bf16 fp8; do
    # TorchTitan's own log line: "step: N  loss: ...  memory: X GiB(...)  tps: N  tflops: N  mfu: N%"
    sed 's/\x1b\[[0-9;]*m//g' "$OUT/titan_$precision.log" | grep -o "step: *[0-9]*.*mfu: [0-9.]*%" | awk -v p="$precision" '
        { step = $2; for (i = 1; i <= NF; i++) { if ($i == "tps:") tps = $(i+1); if ($i == "mfu:") mfu = $(i+1);
          if ($i == "memory:") mem = $(i+1) }
          gsub(",", "", tps); sub("%", "", mfu); sub("GiB.*", "", mem)
          if (step >= 6 && step <= 10) { n++; t += tps; m += mfu; if (mem > peak) peak = mem } }
        END { if (n) printf "TITAN %s steps 6-10: %d tokens/s, %.2f%% MFU, %.1f GiB reserved (n=%d)\n", p, t/n, m/n, peak, n;
              else print "TITAN " p ": no steps 6-10 (see its log)" }'
done
