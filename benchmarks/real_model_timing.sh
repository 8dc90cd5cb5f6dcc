#!/usr/bin/env bash
# Real-model timing mode: vit_base_patch16_224 and deit_small_patch16_224 on random inputs,
# a few steps per policy (ALaST and LoRA policies at 40% of full FLOPs), through `alast bench`.
# Usage: benchmarks/real_model_timing.sh OUT_DIR [extra alast options, e.g. --set backend.precision=bf16]
set -euo pipefail
out=${1:?usage: real_model_timing.sh OUT_DIR [alast options]}
shift
mkdir -p "$out"
alast=${ALAST:-alast}
for model in ${MODELS:-vit_base_patch16_224 deit_small_patch16_224}; do
  $alast bench --model "$model" --data random:512 --steps "${STEPS:-12}" --batch-size "${BATCH:-64}" \
    --policies "${POLICIES:-full,alast,freeze,lora,alast+lora}" --target-flops 0.4 \
    --set output.keep_last=1 "$@" --out "$out/$model" --json > "$out/$model.json"
  cp "$out/$model/results.md" "$out/$model.md"
done
