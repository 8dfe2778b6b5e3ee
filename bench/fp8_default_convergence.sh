#!/bin/bash
# Issue 22's 2,000-step convergence check for the FP8 default, in one device call: bench/fp8_convergence.toml
# in FP8 as `train.fp8 = tensorwise` runs it now (the output layer in FP8, the compile's tile tuning on, the
# logits' GEMM fast-accumulated), and the same without that fast accumulation
# (llamatron.loss.FP8_LOGITS_FAST_ACCUM = False, the default before 2026-12-07 09:30), both at once on the
# GPU, against BF16 on the same tokens.
#
#   bash bench/fp8_default_convergence.sh OUT        # carrying .devdata/tokenizer.model (the Llama 3.1 BPE file)
#
# The corpus is the device's own site-packages (bench/site_packages_corpus.py). Where it is the one of
# 2026-12-06 17:07 (14,124 training documents, 71.2M characters), BF16 on it is docs/bench/res_conv_bf16.jsonl
# and is not run again; otherwise a BF16 run joins the two.
set -u
OUT=${1:?OUT folder}
mkdir -p "$OUT" .devdata
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
python bench/site_packages_corpus.py /tmp/spc | tee "$OUT/corpus.log"
for split in train:train validation:valid; do
    python -m llamatron preprocess --input "/tmp/spc/c4-${split%%:*}.00000-of-00001.json.gz" --workers 12 \
        --output-prefix ".devdata/sp_${split##*:}" --tokenizer .devdata/tokenizer.model >> "$OUT/corpus.log" 2>&1 || exit 2
done
train() {  # train NAME [python -c prelude] -- trainer options
    local name=$1 prelude=$2; shift 2
    python -c "import sys; $prelude; from llamatron.cli import main; sys.exit(main(sys.argv[1:]))" train \
        --config bench/fp8_convergence.toml --set train.out_dir="$OUT/$name" --set train.log_every=50 "$@" \
        > "$OUT/$name.log" 2>&1
    echo "$name: exit $?"
}
train fp8 "pass" --set train.fp8=tensorwise &
train fp8_no_fastaccum "import llamatron.loss as l; l.FP8_LOGITS_FAST_ACCUM = False" --set train.fp8=tensorwise &
BF16=docs/bench/res_conv_bf16.jsonl
if ! grep -q "^14124 train documents (71.2M" "$OUT/corpus.log"; then
    train bf16 "pass" &
    BF16=$OUT/bf16/metrics.jsonl
fi
wait
python bench/plot_losses.py "$BF16" "$OUT/fp8/metrics.jsonl" "$OUT/fp8_no_fastaccum/metrics.jsonl" \
    --labels bf16,fp8-default,fp8-no-fastaccum --png "$OUT/fp8_default_convergence.png"
