#!/usr/bin/env bash
# Issue-6 measurements: inference-time post-training (harden eval --defense adaptive) on Fashion-MNIST, for the
# example base (--adapt all) and a fixer-patched model trained against itself (--adapt patches: only the patches
# of each per-input copy). Static attack: PGD-20 at eps 0.1 on the static model; end-to-end: PGD-10 through the
# whole procedure (BPDA-style) on the first few inputs. One thread.
#   bash bench/adaptive_fmnist.sh FIXER_CHECKPOINT [OUT_DIR]
# FIXER_CHECKPOINT: e.g. run e1 of bench/robust_fmnist.sh (fixers after prep, layer1, layer2, rho 1, PGD-5 vs the
# patched model, mu = lambda = 0, 10 epochs).
set -euo pipefail
cd "$(dirname "$0")/.."
FIXER=$1
OUT=${2:-bench/out/adaptive}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
A=(--data fashion-mnist:test --defense adaptive --reference-data fashion-mnist:train --eps 0.1 --attack pgd
   --steps 20 --quiet)
python -m hardener eval examples/fmnist_base.safetensors --arch examples/fmnist_model.py:resnet9_small --mean 0.2860 \
  --std 0.3530 "${A[@]}" --max-samples 40 --e2e-samples 3 --e2e-steps 5 --adapt all --report "$OUT/ad_base.json"
python -m hardener eval "$FIXER" --arch examples/fmnist_model.py:resnet9_small "${A[@]}" --max-samples 40 \
  --e2e-samples 3 --e2e-steps 5 --adapt patches --report "$OUT/ad_fix.json"
python -m hardener eval "$FIXER" --arch examples/fmnist_model.py:resnet9_small "${A[@]}" --max-samples 200 \
  --e2e-samples 5 --e2e-steps 10 --adapt patches --report "$OUT/ad_fix200.json"
