#!/usr/bin/env bash
# Denoise variants next to the fixer on Fashion-MNIST (example base, 10% of fashion-mnist:train,
# eps 0.1 Linf, training attack APGD-10 on the frozen base). Each patch run reports clean, transfer-
# and white-box APGD-CE (100 steps) on a seeded stratified 500 of fashion-mnist:test; then how the
# defence carries over to attacks it was not trained on: FGSM and CW (PGD-100 with the CW margin
# loss) computed on the base (transfer), and Square (1000 queries) on the patched model (black-box).
#   bash bench/denoise_fmnist.sh [OUT_DIR]      (two lanes of one thread each)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/out/denoise}
mkdir -p "$OUT"
ARCH=(--arch examples/fmnist_model.py:resnet9_small)
run() {  # name, patch options...
  local name=$1; shift
  local t0=$(date +%s)
  OMP_NUM_THREADS=1 harden patch examples/fmnist_base.safetensors "${ARCH[@]}" --mean 0.2860 --std 0.3530 \
    --data fashion-mnist:train --subset 10% --eval-data fashion-mnist:test --eval-samples 500 --eps 0.1 \
    --at layer1,layer2 --out "$OUT/$name.safetensors" --force --report "$OUT/$name.patch.json" --quiet "$@" \
    2> "$OUT/$name.log"
  echo "$name patch_wall_s $(( $(date +%s) - t0 ))" >> "$OUT/times.txt"
  for spec in "fgsm transfer" "cw transfer" "square blackbox"; do
    set -- $spec
    OMP_NUM_THREADS=1 harden eval "$OUT/$name.safetensors" "${ARCH[@]}" --data fashion-mnist:test --max-samples 500 \
      --attack "$1" --threat "$2" --eps 0.1 --queries 1000 --no-checks --quiet --report "$OUT/$name.$1.json" \
      2>> "$OUT/$name.log"
  done
}
lane1() { run fixer; run nonlocal-gaussian --method denoise --denoise nonlocal-gaussian; run mean --method denoise --denoise mean; }
lane2() { run nonlocal-dot --method denoise --denoise nonlocal-dot; run median --method denoise --denoise median; run bilateral --method denoise --denoise bilateral; }
lane1 & lane2 & wait
