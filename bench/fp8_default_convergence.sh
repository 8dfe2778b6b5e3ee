#!/bin/bash
# Issue 22's 2,000-step convergence check for the FP8 default, in one device call: bench/fp8_convergence.toml
# in FP8 as `train.fp8 = tensorwise` runs it now (the output layer in FP8, the compile's tile tuning on, the
# forward GEMMs fast-accumulated, the logits' too), and the same with the gradients' GEMMs fast-accumulated
# as well (`train.fp8_fast_accum`: the input gradients', and all three), the three at once on the GPU,
# against BF16 on the same tokens.
#
#   bash bench/fp8_default_convergence.sh OUT        # carrying .devdata/tokenizer.model (the Llama 3.1 BPE file)
#   RUNS="fp8_fast_all" bash bench/fp8_default_convergence.sh OUT      # just that one
#
# The corpus is the device's own site-packages (bench/site_packages_corpus.py). Where it is the one of
# 2026-12-06 17:07 (14,124 training documents, 71.2M characters), BF16 on it is docs/bench/res_conv_bf16.jsonl
# and is not run again; otherwise a BF16 run joins them.
# (Until 2026-12-07 20:00 the second run was the default without the logits' fast accumulation.)
set -u
OUT=${1:?OUT folder}
mkdir -p "$OUT" .devdata
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
python bench/site_packages_corpus.py /tmp/spc | tee "$OUT/corpus.log"
for split in train:train validation:valid; do
    python -m llamatron preprocess --input "/tmp/spc/c4-${split%%:*}.00000-of-00001.json.gz" --workers 12 \
        --output-prefix ".devdata/sp_${split##*:}" --tokenizer .devdata/tokenizer.model >> "$OUT/corpus.log" 2>&1 || exit 2
done
train() {  # train NAME -- trainer options
    local name=$1; shift
    python -m llamatron train --config bench/fp8_convergence.toml --set train.out_dir="$OUT/$name" \
        --set train.log_every=50 "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $?"
}
# RUNS: which of them (all three by default; a GPU shares them: two took ~7 minutes on an H100 with the corpus).
RUNS=${RUNS:-fp8 fp8_fast_grad_input fp8_fast_all}
for run in $RUNS; do
    case $run in
        fp8) train fp8 --set train.fp8=tensorwise & ;;
        fp8_fast_grad_input) train $run --set train.fp8=tensorwise --set "train.fp8_fast_accum=[output,grad_input]" & ;;
        fp8_fast_all) train $run --set train.fp8=tensorwise --set "train.fp8_fast_accum=[output,grad_input,grad_weight]" & ;;
        *) echo "RUNS: unknown run $run"; exit 2 ;;
    esac
done
BF16=docs/bench/res_conv_bf16.jsonl
if ! grep -q "^14124 train documents (71.2M" "$OUT/corpus.log"; then
    train bf16 &
    BF16=$OUT/bf16/metrics.jsonl
fi
wait
python bench/plot_losses.py "$BF16" $(for r in $RUNS; do echo "$OUT/$r/metrics.jsonl"; done) \
    --labels "bf16,$(echo $RUNS | tr ' ' ,)" --png "$OUT/fp8_default_convergence.png"
