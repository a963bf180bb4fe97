#!/usr/bin/env bash
# The default recipe on architectures other than the example (issues 18 and 21): a VGG-like CNN with SiLU and no
# residuals, and a small ViT (7x7 patches, 4 pre-norm blocks; token fixers and a pre-filter), both defined in
# examples/fmnist_model.py and trained here on all of fashion-mnist:train (examples/train_base.py, 4 epochs), then
# patched with `harden patch BASE --data fashion-mnist:train --subset 10%` (nothing else: the default recipe) and
# evaluated on SAMPLES seeded stratified test images: white-box APGD-CE -> APGD-DLR (100 steps), then BPDA through
# the pre-filter on what they left (threat `adaptive`), eps 0.1. One thread per run.
#   bash bench/archs_fmnist.sh [OUT_DIR] [MODEL...]        # MODEL: vgg_silu_small, vit_small (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/out/archs}
shift || true
MODELS=("$@"); [ ${#MODELS[@]} -gt 0 ] || MODELS=(vgg_silu_small vit_small)
SAMPLES=${SAMPLES:-500}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for m in "${MODELS[@]}"; do
  A=(--arch "examples/fmnist_model.py:$m")
  [ -f "$OUT/$m.base.safetensors" ] || /usr/bin/time -f "%e s wall" python examples/train_base.py --model "$m" \
    --epochs 4 --out "$OUT/$m.base.safetensors" 2> "$OUT/$m.base.log"
  [ -f "$OUT/$m.patched.safetensors" ] || /usr/bin/time -f "%e s wall" python -m hardener patch \
    "$OUT/$m.base.safetensors" "${A[@]}" --mean 0.2860 --std 0.3530 --data fashion-mnist:train --subset 10% \
    --eps 0.1 --force --out "$OUT/$m.patched.safetensors" --report "$OUT/$m.patch.json" ${RECIPE:-} \
    2> "$OUT/$m.patch.log" > /dev/null
  [ -f "$OUT/$m.test.json" ] || /usr/bin/time -f "%e s wall" python -m hardener eval "$OUT/$m.patched.safetensors" \
    "${A[@]}" --data fashion-mnist:test --max-samples "$SAMPLES" --attack apgd-ce,apgd-dlr --threat whitebox,adaptive \
    --eps 0.1 --quiet --report "$OUT/$m.test.json" --report "$OUT/$m.test.md" 2> "$OUT/$m.test.log" > /dev/null
done
