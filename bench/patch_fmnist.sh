#!/usr/bin/env bash
# The Fashion-MNIST measurements behind bench/RESULTS.md (fixer patches on the example base).
# Each run: 10% of fashion-mnist:train (6,000 images, stratified, seed 0), eps 0.1 Linf,
# report on a seeded stratified 2,000 of fashion-mnist:test with APGD-CE 100 steps in both threat
# models. One thread per run (two ran side by side on a 2-core machine).
#   bash bench/patch_fmnist.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/out}
mkdir -p "$OUT"
COMMON=(examples/fmnist_base.safetensors --arch examples/fmnist_model.py:resnet9_small --mean 0.2860 --std 0.3530
        --data fashion-mnist:train --subset 10% --eval-data fashion-mnist:test --eval-samples 2000
        --epochs "${EPOCHS:-20}" --lr 3e-3 --mu 1 --eps 0.1 --at layer1,layer2 --force --quiet)
for adv in base patched; do
  OMP_NUM_THREADS=1 /usr/bin/time -v harden patch "${COMMON[@]}" --adversary "$adv" \
    --out "$OUT/fixer-$adv.safetensors" --report "$OUT/fixer-$adv.json" 2> "$OUT/fixer-$adv.log" &
done
wait
# The full report of the transfer-trained patch (Markdown and HTML for a pull request).
harden eval "$OUT/fixer-base.safetensors" --arch examples/fmnist_model.py:resnet9_small \
  --data fashion-mnist:test --max-samples 1000 --attack apgd-ce,apgd-dlr,fgsm,square --queries 1000 \
  --eps 0.1 --eps-sweep 0,0.03,0.05,0.1,0.2 --quiet \
  --report "$OUT/eval.md" --report "$OUT/eval.html" --report "$OUT/eval.json"
python bench/eval_speed.py --out "$OUT/eval_speed.json"
