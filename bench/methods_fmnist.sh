#!/usr/bin/env bash
# Issue-4 table: every training method on the same data, eps and training attack (bench/RESULTS.md,
# "Methods side by side"). 10% of fashion-mnist:train (6,000 images, stratified, seed 0), eps 0.1 Linf,
# training attack PGD-5 (random start, alpha 2.5*eps/5), 10 epochs; then harden eval on a seeded stratified
# 1,000 of fashion-mnist:test with APGD-CE (100 steps), white-box and transfer. One thread per run.
#   bash bench/methods_fmnist.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/out/methods}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
M=(--arch examples/fmnist_model.py:resnet9_small)
P=(--attack pgd --steps 5 --epochs 10)
run() {  # run NAME [--parent] PATCH-ARGS...
  local name=$1; shift
  local parent=()
  if [ "$1" = "--parent" ]; then parent=(--parent examples/fmnist_base.safetensors); shift; fi
  /usr/bin/time -v python -m hardener patch examples/fmnist_base.safetensors "${M[@]}" --mean 0.2860 --std 0.3530 \
    --data fashion-mnist:train --subset 10% --eps 0.1 --eval-samples 200 --eval-steps 10 --force --quiet \
    --out "$OUT/$name.safetensors" --report "$OUT/$name.patch.json" "$@" > "$OUT/$name.patch.out" 2> "$OUT/$name.patch.log"
  /usr/bin/time -v python -m hardener eval "$OUT/$name.safetensors" "${M[@]}" "${parent[@]}" --data fashion-mnist:test \
    --max-samples 1000 --attack apgd-ce --eps 0.1 --threat all --no-checks --quiet \
    --report "$OUT/$name.test.json" > /dev/null 2> "$OUT/$name.test.log"
}
run m1_fixer_base --at layer1,layer2 "${P[@]}" --adversary base
run m2_auxbn --method auxbn --bn all "${P[@]}" --adversary patched --mu 0 --lam 0
run m3_fixer_auxbn --method fixer,auxbn --at layer1,layer2 --bn all "${P[@]}" --adversary patched --mu 0 --lam 0
run m4_advtrain --parent --method adv-train "${P[@]}" --mu 0 --lr 1e-3
run m5_advprop --parent --method advprop "${P[@]}" --mu 0 --lr 1e-3
run m6_advamd --parent --method advamd "${P[@]}" --mu 0 --lr 1e-3
