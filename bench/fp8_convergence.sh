#!/bin/sh
# The FP8 convergence comparison: the same run in BF16 and in FP8 (tensorwise), metrics to OUT/.
#   sh bench/fp8_convergence.sh OUT [--set ...]
set -e
out=$1; shift
for fp8 in none tensorwise; do
    python -m llamatron train --config bench/fp8_convergence.toml --set train.out_dir="$out/$fp8" \
        --set train.fp8=$fp8 "$@"
done
python bench/plot_losses.py "$out/none/metrics.jsonl" "$out/tensorwise/metrics.jsonl" \
    --labels bf16,fp8-tensorwise --png "$out/fp8_convergence.png"
