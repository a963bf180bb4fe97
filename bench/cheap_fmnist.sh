#!/usr/bin/env bash
# Issue-18 search: a cheaper white-box recipe with a frozen base (bench/RESULTS.md, "A cheaper robust recipe").
# The protocol of bench/robust_fmnist.sh: the example base, 10% of fashion-mnist:train (6,000 images, stratified,
# seed 0), eps 0.1 Linf; recipes compared on VALIDATION data only: 500 training images outside the subset held out
# by --select-on (per-epoch PGD-10, picks the epoch; the preset's) and 500 more for the patch report (its quick
# check: APGD-CE, 20 steps, white-box and transfer). Every run is `--preset robust` (the default recipe) with the
# named changes. One thread per run; /usr/bin/time -v records CPU seconds (wall time depends on the load).
#   bash bench/cheap_fmnist.sh [OUT_DIR] [RUN...]      # the named runs (default: all), skipping finished ones
#   RESUME=1 bash bench/cheap_fmnist.sh OUT_DIR RUN... # continue interrupted runs from OUT_DIR/RUN.safetensors.partial
#   TEST=1 bash bench/cheap_fmnist.sh OUT_DIR RUN...   # their verdict on test, for runs chosen on validation: the
#     verdict's 1,000 seeded stratified images of fashion-mnist:test, white-box APGD-CE -> APGD-DLR (100 steps), and
#     BPDA through the pre-filter on what they left (threat adaptive; patches only), transfer from the base, eps 0.1
#     -> RUN.test.{json,md}
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/out/cheap}
shift || true
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
declare -A RUNS=(
  [c1_nfgsm]="--attack n-fgsm"
  [c2_nfgsm_s2]="--attack n-fgsm --prefilter-stride 2"
  [c3_pgd5_s2]="--prefilter-stride 2"
  [c4_nfgsm_s2_bn]="--attack n-fgsm --prefilter-stride 2 --bn auto"
  [c5_nfgsm_w32_s2]="--attack n-fgsm --width 32 --prefilter-stride 2"
  [p2_pgd2_s2]="--steps 2 --prefilter-stride 2"
  [p2_pgd2_s2_ve2]="--steps 2 --prefilter-stride 2 --validate-every 2"
  [a2_advtrain_pgd2]="--method adv-train --steps 2 --adversary patched --mu 0 --lam 0 --lr 1e-3 --select-on 500"
  [q1_pgd2_ep5]="--steps 2 --epochs 5"
  [q2_pgd2_ep3]="--steps 2 --epochs 3"
  [q3_pgd5_ep5]="--epochs 5"
  [s1_silu_ep5]="--epochs 5 --act silu"
  [u1_1pct_rest9]="--subset 1% --unlabeled rest --pseudo-ratio 9"
  [u2_10pct_rest1]="--unlabeled rest --pseudo-ratio 1"
  [r4_mu2]="--mu 2"
  [r4_mu25]="--mu 2.5"
  [u0_1pct_ep100]="--subset 1% --epochs 100 --validate-every 10"
  [m4u_advtrain_1pct_rest9]="--method adv-train --attack pgd --steps 5 --epochs 10 --mu 0 --lr 1e-3 --subset 1% --unlabeled rest --pseudo-ratio 9"
  [a1_advtrain_nfgsm]="--method adv-train --attack n-fgsm --adversary patched --mu 0 --lam 0 --lr 1e-3 --select-on 500"
)
ORDER=(q2_pgd2_ep3 q1_pgd2_ep5 q3_pgd5_ep5)
[ $# -gt 0 ] && ORDER=("$@")
if [ -n "${TEST:-}" ]; then
  for name in "${ORDER[@]}"; do
    [ -f "$OUT/$name.test.json" ] && continue
    case "${RUNS[$name]}" in *adv-train*) P=(--parent examples/fmnist_base.safetensors --threat whitebox,transfer) ;;
                                      *) P=(--threat whitebox,adaptive,transfer) ;; esac
    /usr/bin/time -v python -m hardener eval "$OUT/$name.safetensors" --arch examples/fmnist_model.py:resnet9_small \
      --data fashion-mnist:test --max-samples 1000 --attack apgd-ce,apgd-dlr --eps 0.1 "${P[@]}" --quiet --force \
      --report "$OUT/$name.test.json" --report "$OUT/$name.test.md" > /dev/null 2> "$OUT/$name.test.log" \
      || echo "$name test failed: see $OUT/$name.test.log" >&2
  done
  exit 0
fi
for name in "${ORDER[@]}"; do
  [ -f "$OUT/$name.json" ] && continue
  # shellcheck disable=SC2086
  /usr/bin/time -v python -m hardener patch examples/fmnist_base.safetensors \
    --arch examples/fmnist_model.py:resnet9_small --mean 0.2860 --std 0.3530 --data fashion-mnist:train --subset 10% \
    --eps 0.1 --eval-samples 500 --force --quiet --out "$OUT/$name.safetensors" --report "$OUT/$name.json" \
    ${RUNS[$name]} ${RESUME:+--resume} > "$OUT/$name.out" 2>> "$OUT/$name.log" || echo "$name failed: see $OUT/$name.log" >&2
done
