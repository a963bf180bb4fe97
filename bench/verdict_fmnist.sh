#!/usr/bin/env bash
# Issue 16's verdict on the default recipe (= --preset robust), example base, 10% of fashion-mnist:train, eps 0.1 Linf,
# the same seeded stratified 1,000 images of fashion-mnist:test in every run (bench/RESULTS.md, "The verdict").
#   bash bench/verdict_fmnist.sh PATCHED SURROGATE [OUT_DIR] [PART]
# PATCHED: the default `harden patch ... --data fashion-mnist:train --subset 10%` checkpoint (bench/ordinary_path.sh
# default writes it); SURROGATE: full adversarial fine-tuning of the base on the same data (m4 of methods_fmnist.sh).
# Three evaluations, one thread each, run as two parallel parts (PART=1: the standard AutoAttack's gradient attacks;
# PART=2: the adaptive attacks, then its Square: about 1.5 h for 1,000 images on one core), combined per sample by bench/verdict_table.py:
#   aa-white  APGD-CE, APGD-T (9 targets), FAB-T (9 targets), 100 steps, white-box           (AutoAttack, part 1)
#   aa-square Square, 5,000 queries, on the model                                           (AutoAttack, part 2)
#   adaptive  APGD-CE + APGD-DLR white-box, then BPDA through the pre-filter (identity backward) and transfer from
#             the adversarially fine-tuned surrogate, both on what white-box left
set -uo pipefail
cd "$(dirname "$0")/.."
P=$1 S=$2 OUT=${3:-bench/out/verdict} PART=${4:-all}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMMON=(--arch examples/fmnist_model.py:resnet9_small --data fashion-mnist:test --max-samples 1000 --eps 0.1 --quiet
        --force --state-dir "$OUT/state")
ev() {  # ev NAME ARGS...
  local name=$1; shift
  [ -f "$OUT/$name.json" ] && return 0  # done
  local resume=(); [ -f "$OUT/$name.started" ] && resume=(--resume)
  touch "$OUT/$name.started"
  /usr/bin/time -f "%e s wall, %M KB peak" python -m hardener eval "$P" "${COMMON[@]}" "$@" "${resume[@]}" \
    --report "$OUT/$name.json" --report "$OUT/$name.md" > /dev/null 2> "$OUT/$name.log"
}
if [ "$PART" = 1 ] || [ "$PART" = all ]; then
  ev aa-white --attack apgd-ce,apgd-t,fab-t --threat whitebox
fi
if [ "$PART" = 2 ] || [ "$PART" = all ]; then
  ev adaptive --attack apgd-ce,apgd-dlr --threat whitebox,adaptive,surrogate --surrogate "$S" --no-checks
  ev aa-square --attack square --queries 5000 --threat blackbox --no-checks
fi
