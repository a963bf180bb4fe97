#!/usr/bin/env bash
# Issue-9 search: white-box robustness with a frozen base (bench/RESULTS.md, "White-box robustness").
# Every configuration trains on 10% of fashion-mnist:train (6,000 images, stratified, seed 0) at eps 0.1 and
# is compared on a VALIDATION split only: 500 training images outside the subset held out by --select-on
# (per-epoch PGD-10, used to pick the epoch) and another 500 for the patch report (PGD-20, white-box and
# transfer). The test set is touched only by the final evaluation at the end, for the chosen recipes.
#   bash bench/robust_fmnist.sh [OUT_DIR]          # everything (about 4 CPU-hours: one thread per run)
#   STAGE=final bash bench/robust_fmnist.sh        # only the final test evaluations
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/out/robust}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ARCH=(--arch examples/fmnist_model.py:resnet9_small)
search() {  # search NAME PATCH-ARGS...
  local name=$1; shift
  /usr/bin/time -v python -m hardener patch examples/fmnist_base.safetensors "${ARCH[@]}" --mean 0.2860 --std 0.3530 \
    --data fashion-mnist:train --subset 10% --eps 0.1 --eval-samples 500 --eval-steps 20 --force --quiet \
    --out "$OUT/$name.safetensors" --report "$OUT/$name.json" "$@" > "$OUT/$name.out" 2> "$OUT/$name.log"
}
final() {  # final DIR NAME [--parent P]: 1,000 test images, APGD-CE + APGD-DLR (100 steps) + Square (5,000 queries)
  local dir=$1 name=$2; shift 2
  /usr/bin/time -v python -m hardener eval "$dir/$name.safetensors" "${ARCH[@]}" "$@" --data fashion-mnist:test \
    --max-samples 1000 --attack apgd-ce,apgd-dlr,square --queries 5000 --eps 0.1 --threat all --quiet \
    --report "$OUT/$name.test.json" --report "$OUT/$name.test.md" > /dev/null 2> "$OUT/$name.test.log"
}
A=(--adversary patched --attack pgd --steps 5 --lam 0)
if [ "${STAGE:-all}" != final ]; then
  search e1_fix3_pgd5 --at prep,layer1,layer2 --rho 1 "${A[@]}" --mu 0 --epochs 10
  search e2_prefilter_trades6 --method fixer,auxbn --at prefilter:input,layer1 --bn all --width 32 "${A[@]}" --mu 0 \
    --loss trades --beta 6 --epochs 10 --eps-warmup 2 --select-on 500
  search e3_fix3_trades6 --at prep,layer1,layer2 --rho 1 "${A[@]}" --mu 0 --epochs 10 --loss trades --beta 6 --select-on 500
  search r1_fix3_mu1 --at prep,layer1,layer2 --rho 1 "${A[@]}" --mu 1 --epochs 10 --select-on 500
  search r2_fix3_ep20 --at prep,layer1,layer2 --rho 1 "${A[@]}" --mu 0 --epochs 20 --select-on 500
  search r3_fix3_auxbn --method fixer,auxbn --at prep,layer1,layer2 --bn all --rho 1 "${A[@]}" --mu 0 --epochs 10 --select-on 500
  search r4_pre64_fix3_mu1 --at prefilter:input,prep,layer1,layer2 --width 64 --rho 1 "${A[@]}" --mu 1 --epochs 10 --select-on 500
  search r6_fix3_mu3 --at prep,layer1,layer2 --rho 1 "${A[@]}" --mu 3 --epochs 10 --select-on 500
  search r7_fix3_auxbn_mu1_ep15 --method fixer,auxbn --at prep,layer1,layer2 --bn all --rho 1 "${A[@]}" --mu 1 \
    --epochs 15 --select-on 500
  search r8_pre64_fix3_auxbn_mu1 --method fixer,auxbn --at prefilter:input,prep,layer1,layer2 --width 64 --bn all \
    --rho 1 "${A[@]}" --mu 1 --epochs 10 --select-on 500
fi
# The baseline, full adversarial fine-tuning with the same data, attack and epochs, is trained by
# bench/methods_fmnist.sh (m4_advtrain); its checkpoint is expected in $METHODS_OUT.
METHODS_OUT=${METHODS_OUT:-bench/out/methods}
# Final: the chosen recipe (r4 = what --preset robust resolves to on this model) and the baseline, on test.
final "$OUT" r4_pre64_fix3_mu1
final "$METHODS_OUT" m4_advtrain --parent examples/fmnist_base.safetensors
