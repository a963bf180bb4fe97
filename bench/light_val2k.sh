#!/usr/bin/env bash
# Issue 30's second validation (bench/light_val2k.py): light_fmnist.sh's checkpoints on 2,000 fashion-mnist:test
# images the bases never trained on, disjoint from the verdict's 1,000; white-box APGD-CE -> APGD-DLR at 20 steps each
# through the patches, eps 0.1, one thread -> OUT_DIR/RUN.val2k.json (skipped when there).
#   bash bench/light_val2k.sh OUT_DIR RUN...     # RUN as light_fmnist.sh names it (r-, v-, t-), its checkpoint in OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: light_val2k.sh OUT_DIR RUN...}
shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
declare -A ARCH=([r]=resnet9_small [v]=vgg_silu_small [t]=vit_small)
VAL=$OUT/val2k.npz
[ -f "$VAL" ] || python bench/light_val2k.py "$VAL"
for run in "$@"; do
  [ -f "$OUT/$run.val2k.json" ] && continue
  /usr/bin/time -v python -m hardener eval "$OUT/$run.safetensors" --arch "examples/fmnist_model.py:${ARCH[${run%%-*}]}" \
    --data "$VAL" --attack apgd-ce,apgd-dlr --steps 20 --eps 0.1 --threat whitebox --quiet --force \
    --report "$OUT/$run.val2k.json" --base-cache "$OUT/base-cache-val2k" > /dev/null 2> "$OUT/$run.val2k.log" \
    || echo "$run failed: see $OUT/$run.val2k.log" >&2
done
